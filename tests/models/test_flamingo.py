"""The single-process Flamingo model: placement, closed gates, the trainable set, bad input."""

from __future__ import annotations

import pytest
import torch

from megaflamingo.config import KernelsConfig, LMConfig, ModelConfig, PerceiverConfig, VisionConfig, XAttnConfig
from megaflamingo.models.flamingo import build_model, xattn_layer_indices
from tests.assets import TINY_VISION

MEDIA, EOC = 250, 251


def tiny_config(family: str = "llama", every_n: int = 2, **lm) -> ModelConfig:
    lm_kwargs = dict(family=family, vocab_size=256, hidden_size=64, num_layers=4, num_heads=4)
    lm_kwargs.update(lm)
    return ModelConfig(
        vision=VisionConfig(open_clip_config=TINY_VISION),
        lm=LMConfig(**lm_kwargs),
        cross_attn_every_n_layers=every_n,
        perceiver=PerceiverConfig(depth=2, heads=2, dim_head=16, num_latents=8, ff_mult=2),
        xattn=XAttnConfig(heads=2, dim_head=16, ff_mult=2),
        media_token_id=MEDIA,
        eoc_token_id=EOC,
        kernels=KernelsConfig(xattn="reference"),
    )


def batch(B: int = 2, T: int = 12, M: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 240, (B, T), generator=gen)
    ids[:, 3] = MEDIA
    ids[0, 8] = MEDIA
    ids[:, 6] = EOC
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -3:] = 0
    return torch.randn(B, M, 1, 3, 32, 32, generator=gen), ids, mask


def test_placement_rule():
    assert xattn_layer_indices(32, 4) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert xattn_layer_indices(4, 1) == [0, 1, 2, 3]
    assert xattn_layer_indices(4, 2) == [1, 3]
    model = build_model(tiny_config(every_n=2))
    assert sorted(model.xattn.keys(), key=int) == ["1", "3"]


@pytest.mark.parametrize("family", ["llama", "mpt", "gpt_neox"])
def test_closed_gates_give_the_bare_lm_exactly(family):
    torch.manual_seed(0)
    model = build_model(tiny_config(family=family, every_n=1)).eval()
    images, ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(model(images, ids, mask), model.lm(ids, mask))
        for block in model.xattn.values():
            block.attn_gate.fill_(0.5)
        assert not torch.allclose(model(images, ids, mask), model.lm(ids, mask))


def test_trainable_set_is_fixed_at_construction():
    model = build_model(tiny_config())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    for name in trainable:
        assert name.startswith(("perceiver.", "xattn.")) or name == "lm.embed_tokens.added", name
    assert "perceiver.latents" in trainable and "lm.embed_tokens.added" in trainable
    assert all(not p.requires_grad for p in model.vision.parameters())
    assert model.lm.embed_tokens.added.shape[0] == 2


def test_gradients_reach_only_the_trainable_set():
    torch.manual_seed(0)
    model = build_model(tiny_config(every_n=1))
    with torch.no_grad():
        for block in model.xattn.values():
            block.attn_gate.fill_(0.3)
            block.ff_gate.fill_(0.3)
    images, ids, mask = batch()
    model(images, ids, mask).sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_frozen_embedding_option():
    cfg = tiny_config()
    cfg.freeze_lm_embeddings = True
    model = build_model(cfg)
    assert model.lm.embed_tokens.added is None


def test_video_frames_are_rejected():
    model = build_model(tiny_config())
    _, ids, mask = batch()
    with pytest.raises(ValueError, match=r"vision_x must be \(B, M, 1, C, S, S\)"):
        model(torch.zeros(2, 2, 2, 3, 32, 32), ids, mask)


def test_cost_does_not_build_a_dense_media_mask(monkeypatch):
    """The model's attention path never calls the dense (T x M*N) reference."""
    import megaflamingo.kernels.xattn.reference as ref

    def boom(*args, **kwargs):
        raise AssertionError("dense media mask built")

    monkeypatch.setattr(ref, "media_attention_dense", boom)
    model = build_model(tiny_config())
    images, ids, mask = batch(M=33)
    model(images, ids, mask).sum().backward()


def test_perceiver_shared_latents_are_projected_once_with_the_same_values():
    """The first layer's latents (the parameter expanded over every image) are normed and projected
    once: the output equals that of the same latents materialised per image bit for bit, and the
    gradients agree to fp32 rounding (the per-image rows are summed before, not after, to_q / to_kv)."""
    from megaflamingo.models.perceiver import PerceiverAttention

    torch.manual_seed(0)
    attn = PerceiverAttention(dim=32, heads=2, dim_head=16)
    media = torch.randn(2, 3, 5, 32)
    latents = torch.randn(8, 32, requires_grad=True)
    shared = attn(media, latents.expand(2, 3, -1, -1))
    per_image = attn(media, latents.expand(2, 3, -1, -1).contiguous())
    assert torch.equal(shared, per_image)
    wrt = [latents, attn.to_q.weight, attn.to_kv.weight, attn.norm_latents.weight]
    g = torch.randn_like(shared)
    for a, b in zip(torch.autograd.grad(shared, wrt, g), torch.autograd.grad(per_image, wrt, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
