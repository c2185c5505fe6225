"""Our DecoderLM against transformers' own models: same logits, same weights, clear load errors.

Every variant of tests/hf_models.py is saved by transformers, loaded by `load_hf_lm`, and compared
in fp32 on a batch with no padding, right padding and left padding (only real positions count).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megaflamingo.config import LMConfig
from megaflamingo.models.attention import attention_backend, self_attention
from megaflamingo.models.decoder import build_decoder
from megaflamingo.models.families import FAMILIES
from megaflamingo.models.hf_weights import (
    hf_to_ours,
    lm_config_from_hf,
    load_hf_lm,
    ours_to_hf,
    read_hf_state_dict,
)
from tests.hf_models import VARIANTS, VOCAB_SIZE, save_tiny_hf_lm

TOL = 1e-5
B, T = 3, 12
LENGTHS = (12, 7, 3)  # real tokens per row


def _mask(side: str) -> torch.Tensor | None:
    if side == "none":
        return None
    rows = [[1] * n + [0] * (T - n) for n in LENGTHS]
    mask = torch.tensor(rows)
    return mask if side == "right" else mask.flip(1)


def _ids(seed: int = 0, vocab: int = VOCAB_SIZE) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _hf_logits(path: Path, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _max_diff_real(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> float:
    real = torch.ones(a.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    return (a - b)[real].abs().max().item()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> checkpoint dir, each saved once per module."""
    cache: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in cache:
            cache[variant] = save_tiny_hf_lm(variant, tmp_path_factory.mktemp(variant))
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers_with_padding(saved, variant):
    path = saved(variant)
    ours = load_hf_lm(path)
    ids = _ids()
    for side in ("none", "right", "left"):
        mask = _mask(side)
        with torch.no_grad():
            got = ours(ids, mask)
        want = _hf_logits(path, ids, mask)
        assert got.shape == want.shape == (B, T, VOCAB_SIZE)
        assert torch.isfinite(got).all(), f"{variant}/{side}: non-finite logits (padded rows too)"
        assert _max_diff_real(got, want, mask) <= TOL, f"{variant}/{side}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_mapping_gives_back_the_checkpoint(saved, variant):
    path = saved(variant)
    on_disk = read_hf_state_dict(path)
    exported = ours_to_hf(load_hf_lm(path).merged_state_dict(), lm_config_from_hf(path))
    assert sorted(exported) == sorted(on_disk)
    for name, tensor in on_disk.items():
        assert torch.equal(exported[name], tensor), name


def test_layer_by_layer_composition_equals_forward(saved):
    """The Flamingo wrapper drives embed -> attention_context -> layers -> logits itself."""
    model = load_hf_lm(saved("llama_gqa"))
    ids, mask = _ids(1), _mask("left")
    with torch.no_grad():
        h = model.embed(ids)
        ctx = model.attention_context(mask, T, h.device, h.dtype)
        for layer in model.layers:
            h = layer(h, ctx)
        stepwise = model.logits(h)
        assert torch.equal(stepwise, model(ids, mask))
        # an all-ones mask is the same as no mask
        assert torch.equal(model(ids, torch.ones(B, T)), model(ids))


@pytest.mark.parametrize("variant", ["llama_gqa", "llama_tied", "gpt_neox_parallel", "qwen2_tied"])
def test_vocab_resize_keeps_shared_rows(saved, variant):
    path = saved(variant)
    base = load_hf_lm(path)
    grown = load_hf_lm(path, vocab_size=VOCAB_SIZE + 7)
    shrunk = load_hf_lm(path, vocab_size=VOCAB_SIZE - 20)
    heads = [("embed_tokens", lambda m: m.embed_tokens.merged_weight())]
    if base.lm_head is not None:
        heads.append(("lm_head", lambda m: m.lm_head.weight.detach()))
    for name, table in heads:
        old, big, small = table(base), table(grown), table(shrunk)
        assert big.shape[0] == VOCAB_SIZE + 7 and small.shape[0] == VOCAB_SIZE - 20, name
        assert torch.equal(big[:VOCAB_SIZE], old), name
        assert torch.equal(small, old[: VOCAB_SIZE - 20]), name
        assert torch.allclose(big[VOCAB_SIZE:], old.mean(0).expand(7, -1)), name
    ids = _ids(2, vocab=VOCAB_SIZE - 20)
    with torch.no_grad():
        want = base(ids)
        assert torch.equal(grown(ids)[..., :VOCAB_SIZE], want)
        assert torch.equal(shrunk(ids), want[..., : VOCAB_SIZE - 20])


def test_trainable_ids_keep_logits(saved):
    path = saved("llama_tied")
    ids = _ids(3)
    plain, split = load_hf_lm(path), load_hf_lm(path, trainable_ids=(5, VOCAB_SIZE - 1))
    assert torch.equal(split.embed_tokens.added.detach(),
                       plain.embed_tokens.weight.detach()[[5, VOCAB_SIZE - 1]])
    with torch.no_grad():
        # the tied head computes the added columns in a separate matmul: equal up to rounding
        assert (split(ids) - plain(ids)).abs().max().item() <= 1e-6


def test_sharded_safetensors_and_bin_load_the_same(tmp_path):
    from transformers import AutoModelForCausalLM

    src = save_tiny_hf_lm("gpt_neox_sequential", tmp_path / "one")
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((src / "config.json").read_text())
    torch.save(load_file(str(src / "model.safetensors")), bin_dir / "pytorch_model.bin")
    ids = _ids(4)
    with torch.no_grad():
        want = load_hf_lm(src)(ids)
        assert torch.equal(load_hf_lm(tmp_path / "sharded")(ids), want)
        assert torch.equal(load_hf_lm(bin_dir)(ids), want)


def test_mpt_mlp_width_comes_from_the_weights(tmp_path):
    """transformers' MptMLP is 4 * d_model whatever expansion_ratio says; we read the weights."""
    path = save_tiny_hf_lm("mpt", tmp_path, expansion_ratio=2)
    ids, mask = _ids(5), _mask("right")
    with torch.no_grad():
        got = load_hf_lm(path)(ids, mask)
    assert _max_diff_real(got, _hf_logits(path, ids, mask), mask) <= TOL


def test_unknown_model_type_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt", "vocab_size": 10}))
    with pytest.raises(ValueError, match="model_type 'opt'"):
        lm_config_from_hf(tmp_path)
    with pytest.raises(ValueError, match="model_type 'opt'"):
        load_hf_lm(tmp_path)


def test_qwen2_sliding_window_is_a_clear_error(tmp_path):
    path = save_tiny_hf_lm("qwen2_untied", tmp_path, use_sliding_window=True, sliding_window=4,
                           max_window_layers=1)
    with pytest.raises(ValueError, match="sliding-window"):
        lm_config_from_hf(path)


def test_qwen2_biases_are_on_qkv_only(saved):
    layer = load_hf_lm(saved("qwen2_tied")).layers[0]
    assert all(getattr(layer.attn, p).bias is not None for p in ("q_proj", "k_proj", "v_proj"))
    assert layer.attn.o_proj.bias is None and layer.mlp.up_proj.bias is None


def test_unsupported_mpt_option_is_a_clear_error(tmp_path):
    path = save_tiny_hf_lm("mpt", tmp_path, attn_config={"qk_ln": True})
    with pytest.raises(ValueError, match="qk_ln"):
        lm_config_from_hf(path)


def _rewrite_weights(path: Path, edit) -> None:
    file = path / "model.safetensors"
    state = load_file(str(file))
    edit(state)
    save_file(state, str(file), metadata={"format": "pt"})


def test_missing_key_is_named(tmp_path):
    path = save_tiny_hf_lm("llama_gqa", tmp_path)
    _rewrite_weights(path, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing key 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_hf_lm(path)


def test_missing_fused_qkv_is_named(tmp_path):
    path = save_tiny_hf_lm("mpt", tmp_path)
    _rewrite_weights(path, lambda s: s.pop("transformer.blocks.0.attn.Wqkv.weight"))
    with pytest.raises(ValueError, match=r"missing key 'transformer\.blocks\.0\.attn\.Wqkv\."):
        load_hf_lm(path)


def test_unexpected_key_is_named(tmp_path):
    path = save_tiny_hf_lm("gpt_neox_parallel", tmp_path)
    _rewrite_weights(path, lambda s: s.update({"gpt_neox.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected key 'gpt_neox\.extra\.weight'"):
        load_hf_lm(path)


def test_ignored_hf_buffers_do_not_fail(saved):
    path = saved("gpt_neox_parallel")
    cfg = lm_config_from_hf(path)
    state = dict(read_hf_state_dict(path))
    state["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    state["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    state["gpt_neox.rotary_emb.inv_freq"] = torch.ones(2)
    assert sorted(hf_to_ours(state, cfg)) == sorted(hf_to_ours(read_hf_state_dict(path), cfg))


def test_unsupported_rope_scaling_is_a_clear_error():
    cfg = LMConfig(family="llama", rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        build_decoder(cfg)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_inline_config_builds_and_runs(family):
    cfg = LMConfig(family=family, vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                   num_kv_heads=2 if FAMILIES[family].grouped_query else None, rotary_pct=0.5,
                   tie_word_embeddings=family != "gpt_neox")
    model = build_decoder(cfg, vocab_size=53, trainable_ids=(51, 52))
    with torch.no_grad():
        logits = model(torch.randint(0, 53, (2, 5)), torch.tensor([[1] * 5, [0, 0, 1, 1, 1]]))
    assert logits.shape == (2, 5, 53) and torch.isfinite(logits).all()
    assert (model.lm_head is None) == cfg.tie_word_embeddings


def test_self_attention_gqa_padding_matches_dense_reference():
    assert attention_backend() in ("sdpa",) or attention_backend().startswith("flash-attn")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=gen)
    k, v = torch.randn(2, 2, 6, 8, generator=gen), torch.randn(2, 2, 6, 8, generator=gen)
    keys = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    out = self_attention(q, k, v, causal=True, key_padding_mask=keys)
    k4, v4 = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = q @ k4.transpose(-1, -2) / 8 ** 0.5
    allowed = torch.ones(6, 6, dtype=torch.bool).tril() & keys[:, None, None, :]
    want = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v4
    assert torch.isfinite(out).all()  # fully padded query rows stay finite
    real = keys[:, None, :, None].expand_as(out)
    assert (out - want)[real].abs().max().item() <= 1e-6
