"""MPT-1B-redpajama's MosaicGPT remote-code layout loads as HF MPT: a synthetic MosaicGPT directory
(config.json with model_type "mosaic_gpt", pytorch_model.bin under MosaicGPT's tensor names, built
from the public layout of `mosaic_gpt.py` / `gpt_blocks.py` / `attention.py`, MosaicML examples
v0.0.4) gives the same logits as transformers' MptForCausalLM with the same weights; options the
model cannot compute are one-line errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

from megaflamingo.models.mosaicgpt import as_hf_mpt_state, mpt_config
from megaflamingo.models.hf_weights import lm_config_from_hf, load_hf_lm
from tests.hf_models import build_tiny_hf_lm

# HF MPT name -> MosaicGPT name (the public layout; written independently of the converter's table)
TO_MOSAIC = ((r"\.norm_1\.", ".ln_1."), (r"\.norm_2\.", ".ln_2."), (r"\.ffn\.up_proj\.", ".mlp.mlp_up."),
             (r"\.ffn\.down_proj\.", ".mlp.mlp_down."), (r"^transformer\.norm_f\.", "transformer.ln_f."))


def _mosaic_dir(tmp_path, hf_model, **config_overrides):
    cfg = hf_model.config
    config = {"model_type": "mosaic_gpt", "architectures": ["MosaicGPT"], "d_model": cfg.d_model,
              "n_heads": cfg.n_heads, "n_layers": cfg.n_layers, "mlp_ratio": 4, "max_seq_len": cfg.max_seq_len,
              "vocab_size": cfg.vocab_size, "alibi": True, "alibi_bias_max": 8,
              "attn_clip_qkv": cfg.attn_config.clip_qkv, "attn_qk_ln": False, "attn_impl": "torch",
              "attn_pdrop": 0.0, "resid_pdrop": 0.0, "emb_pdrop": 0.0, "no_bias": True,
              "low_precision_layernorm": True, "softmax_scale": None, "logit_scale": None, "prefix_lm": False,
              "init_device": "cpu", **config_overrides}
    state = {}
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight":
            continue  # MosaicGPT ties its head to wte and stores no head
        for pattern, replacement in TO_MOSAIC:
            name = re.sub(pattern, replacement, name)
        state[name] = tensor.clone()
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(state, tmp_path / "pytorch_model.bin")
    return tmp_path


def test_mosaicgpt_dir_loads_as_mpt_with_the_same_logits(tmp_path):
    reference = build_tiny_hf_lm("mpt", seed=3)
    path = _mosaic_dir(tmp_path / "mpt1b", reference)
    assert any(".mlp.mlp_up." in k for k in torch.load(path / "pytorch_model.bin", weights_only=True))
    cfg = lm_config_from_hf(path)
    assert (cfg.family, cfg.num_layers, cfg.qkv_clip) == ("mpt", reference.config.n_layers, 1.0)
    ours = load_hf_lm(path).eval()
    ids = torch.randint(0, reference.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        want, got = reference(ids, attention_mask=mask).logits, ours(ids, mask)
    keep = mask.bool()
    assert ((got[keep] - want[keep]).abs().max() / want[keep].abs().max()).item() <= 1e-5


def test_options_the_model_cannot_compute_are_one_line_errors(tmp_path):
    reference = build_tiny_hf_lm("mpt", seed=3)
    with pytest.raises(ValueError, match="qk_ln=True is not supported"):
        lm_config_from_hf(_mosaic_dir(tmp_path / "qk", reference, attn_qk_ln=True))  # MPT-1B's QK LayerNorm
    with pytest.raises(ValueError, match="lacks 'n_heads'"):
        mpt_config({"model_type": "mosaic_gpt", "d_model": 8, "n_layers": 1, "vocab_size": 4})
    with pytest.raises(ValueError, match="unexpected key 'transformer.blocks.0.mlp.gate.weight'"):
        as_hf_mpt_state({"transformer.blocks.0.ln_1.weight": torch.ones(2),
                         "transformer.blocks.0.mlp.gate.weight": torch.ones(2, 2)})
