"""Parity with the real reference: the `open-flamingo` package (PyPI 2.0.1) built through its own factory.

The reference model is built by `open_flamingo.create_model_and_transforms` from a tiny open_clip
config, a tiny Hugging Face LM directory and an offline BPE tokenizer. Its gates are set to non-zero
random values and its Perceiver / cross-attention weights randomised; megaflamingo then imports the
same weights (vision from the open_clip state, LM from the HF dir, the rest through the OpenFlamingo
importer) and must produce the same logits.

Deliberate differences from the reference, and how this test handles each:
- open_clip >= 2.23 applies `ln_post` to the patch tokens; the released models (open_clip <= 2.22) did
  not (reference §0.1). megaflamingo always uses the pre-`ln_post` tokens, so the reference is run with
  `final_ln_after_pool = True`, which restores the released behaviour.
- New embedding rows: transformers' mean-resizing draws them at random; megaflamingo initialises them
  to the mean row. The comparison imports the reference's whole embedding (and output head), as a
  released checkpoint would carry it, so the initialisation does not enter the comparison.
"""

from __future__ import annotations

import pytest
import torch

from megaflamingo.config import LMConfig, ModelConfig, VisionConfig, XAttnConfig, PerceiverConfig, KernelsConfig
from megaflamingo.convert.openflamingo import (
    CheckpointError,
    export_openflamingo_state_dict,
    import_openflamingo_state_dict,
)
from megaflamingo.data.tokenizer import load_tokenizer
from megaflamingo.builder import build_model  # resolves the tokenizer, then builds
from megaflamingo.models.flamingo import xattn_layer_indices
from tests.assets import TINY_VISION, make_bpe_tokenizer
from tests.hf_models import save_tiny_hf_lm

open_flamingo = pytest.importorskip("open_flamingo")
open_clip = pytest.importorskip("open_clip")

TINY_NAME = "megaflamingo-test-tiny-vit"
PERCEIVER = PerceiverConfig(depth=2, heads=2, dim_head=16, num_latents=8, ff_mult=2)


def _register_tiny_vision() -> None:
    # The reference factory only takes open_clip model *names*: register the tiny config under one.
    open_clip.factory._MODEL_CONFIGS[TINY_NAME] = TINY_VISION


def _randomise(module: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.dim() == 1 and p.numel() > 1 else 0.0))


def _build_reference(tmp_path, variant: str, every_n: int, seed: int = 0):
    _register_tiny_vision()
    tok_dir = make_bpe_tokenizer(tmp_path / "tok")
    layers_key = "n_layers" if variant.startswith("mpt") else "num_hidden_layers"
    lm_dir = save_tiny_hf_lm(variant, tmp_path / f"lm-{variant}", **{layers_key: 4})
    torch.manual_seed(seed)
    ref, _, tokenizer = open_flamingo.create_model_and_transforms(
        TINY_NAME, None, str(lm_dir), str(tok_dir), cross_attn_every_n_layers=every_n, use_local_files=True
    )
    # Reference §0.1: restore the released models' pre-ln_post vision tokens.
    ref.vision_encoder.final_ln_after_pool = True
    # The reference's Perceiver defaults (depth 6, 8 heads x 64) are shrunk to keep the test fast.
    ref.perceiver = open_flamingo.src.helpers.PerceiverResampler(
        dim=TINY_VISION["vision_cfg"]["width"], depth=PERCEIVER.depth, dim_head=PERCEIVER.dim_head,
        heads=PERCEIVER.heads, num_latents=PERCEIVER.num_latents, ff_mult=PERCEIVER.ff_mult,
    )
    gen = torch.Generator().manual_seed(seed + 1)
    _randomise(ref.perceiver, gen)
    _randomise(ref.lang_encoder.gated_cross_attn_layers, gen)
    # A learned ln_post affine (as trained CLIP has) makes the ln_post trap visible in the logits.
    _randomise(ref.vision_encoder.ln_post, gen)
    with torch.no_grad():
        for block in ref.lang_encoder.gated_cross_attn_layers:
            if block is not None:  # gates at non-zero values, both signs
                block.attn_gate.uniform_(-1.0, 1.0, generator=gen)
                block.ff_gate.uniform_(-1.0, 1.0, generator=gen)
    vision_path = tmp_path / "vision.pt"
    torch.save(ref.vision_encoder.state_dict(), vision_path)
    ref.eval()
    return ref, tokenizer, tok_dir, lm_dir, vision_path


def _our_config(tok_dir, lm_dir, vision_path, every_n: int) -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(open_clip_config=TINY_VISION, weights=str(vision_path)),
        lm=LMConfig(hf_path=str(lm_dir)),
        tokenizer=str(tok_dir),
        cross_attn_every_n_layers=every_n,
        perceiver=PERCEIVER,
        xattn=XAttnConfig(heads=8, dim_head=64, ff_mult=4),  # what the reference's factory builds
        kernels=KernelsConfig(xattn="reference"),
    )


DOCS = [
    "some text before the first image <image>a blue circle<|endofchunk|><image>a red square<|endofchunk|>",
    "<image>Question: what color is the shape? Short answer: green<|endofchunk|><|endoftext|>",
    "two images then text <image>one<|endofchunk|><image>",  # <image> as the very last real token
    "<image>a<|endofchunk|><image>b<|endofchunk|><image>c<|endofchunk|> tail text after three images",
]


def _batch(tokenizer, padding_side: str, num_media: int = 3, seed: int = 0):
    tokenizer.padding_side = padding_side
    enc = tokenizer(DOCS, return_tensors="pt", padding="longest")
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(len(DOCS), num_media, 1, 3, 32, 32, generator=gen)
    images[1, 1:] = 0  # one image for the one-image doc: zero-padded like the data pipelines
    return images, enc.input_ids, enc.attention_mask


def _rel_err(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask.bool()
    return ((ours[keep] - ref[keep]).abs().max() / ref[keep].abs().max()).item()


@pytest.mark.parametrize(
    "variant,every_n",
    [("llama_gqa", 1), ("llama_gqa", 2), ("llama_gqa", 4), ("llama_tied", 2), ("mpt", 1), ("mpt", 2), ("mpt", 4)],
)
def test_logits_match_reference(tmp_path, variant, every_n):
    ref, tokenizer, tok_dir, lm_dir, vision_path = _build_reference(tmp_path, variant, every_n)
    ours = build_model(_our_config(tok_dir, lm_dir, vision_path, every_n)).eval()
    ignored = import_openflamingo_state_dict(ours, ref.state_dict())
    assert any(k.startswith("vision_encoder.") for k in ignored)  # frozen weights come from sources
    assert sorted(int(i) for i in ours.xattn) == xattn_layer_indices(4, every_n)
    for side in ("right", "left"):
        images, ids, mask = _batch(tokenizer, side)
        with torch.no_grad():
            expected = ref(images, ids, attention_mask=mask).logits
            got = ours(images, ids, attention_mask=mask)
        assert got.shape == expected.shape
        assert _rel_err(got, expected, mask) <= 1e-5, (variant, every_n, side)


def test_more_image_tokens_than_images_matches_reference(tmp_path):
    """Extra `<image>` tokens attend uniformly to all media in the reference; we follow it."""
    ref, tokenizer, tok_dir, lm_dir, vision_path = _build_reference(tmp_path, "llama_gqa", 1)
    ours = build_model(_our_config(tok_dir, lm_dir, vision_path, 1)).eval()
    import_openflamingo_state_dict(ours, ref.state_dict())
    images, ids, mask = _batch(tokenizer, "right", num_media=2)  # doc 3 has 3 <image> tokens, 2 images
    with torch.no_grad():
        assert _rel_err(ours(images, ids, mask), ref(images, ids, attention_mask=mask).logits, mask) <= 1e-5


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    ref, _, tok_dir, lm_dir, vision_path = _build_reference(tmp_path, "llama_gqa", 2)
    cfg = _our_config(tok_dir, lm_dir, vision_path, 2)
    first = build_model(cfg)
    import_openflamingo_state_dict(first, ref.state_dict())
    exported = export_openflamingo_state_dict(first)
    path = tmp_path / "checkpoint.pt"
    torch.save({f"module.{k}": v for k, v in exported.items()}, path)  # DDP prefix tolerated
    torch.manual_seed(123)
    second = build_model(cfg)  # a different random init
    import_openflamingo_state_dict(second, torch.load(path, weights_only=True))
    again = export_openflamingo_state_dict(second)
    assert exported.keys() == again.keys()
    assert all(torch.equal(exported[k], again[k]) for k in exported)
    for (name, p), (_, q) in zip(first.named_parameters(), second.named_parameters()):
        if p.requires_grad:
            assert torch.equal(p, q), name


def test_import_errors_name_the_key(tmp_path):
    ref, _, tok_dir, lm_dir, vision_path = _build_reference(tmp_path, "mpt", 1)
    ours = build_model(_our_config(tok_dir, lm_dir, vision_path, 1))
    state = export_openflamingo_state_dict(ours)
    missing = dict(state)
    del missing["perceiver.latents"]
    with pytest.raises(CheckpointError, match="missing key in checkpoint: perceiver.latents"):
        import_openflamingo_state_dict(ours, missing)
    bad_shape = dict(state)
    bad_shape["perceiver.latents"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"perceiver.latents: checkpoint shape \(3, 3\)"):
        import_openflamingo_state_dict(ours, bad_shape)
    unknown = dict(state, **{"something.else": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="unexpected key in checkpoint: something.else"):
        import_openflamingo_state_dict(ours, unknown)


@pytest.mark.parametrize("with_pad", [False, True])
def test_tokenizer_matches_reference_factory(tmp_path, with_pad):
    """Same added tokens, ids and vocabulary size as open_flamingo's factory gives its tokenizer."""
    from megaflamingo.data.tokenizer import flamingo_token_ids

    _register_tiny_vision()
    tok_dir = make_bpe_tokenizer(tmp_path / "tok", with_pad=with_pad)
    lm_dir = save_tiny_hf_lm("llama_tied", tmp_path / "lm")
    _, _, ref_tok = open_flamingo.create_model_and_transforms(
        TINY_NAME, None, str(lm_dir), str(tok_dir), use_local_files=True)
    tok, ids = load_tokenizer(tok_dir)
    assert ids == flamingo_token_ids(ref_tok)
    assert ids.vocab_size == len(ref_tok) == (302 if with_pad else 303)
    assert ids.pad_token_id == ref_tok.pad_token_id
    assert tok(DOCS).input_ids == ref_tok(DOCS).input_ids
