"""Resamplers behind one contract: (B, M, P, Dv) -> (B, M, N, Dv); the Perceiver stays the default."""

from __future__ import annotations

import pytest
import torch

from megaflamingo.config import ModelConfig, PerceiverConfig
from megaflamingo.models.perceiver import PerceiverResampler
from megaflamingo.models.resamplers import TokenNorm, build_resampler

PERCEIVER = PerceiverConfig(depth=2, heads=2, dim_head=8, num_latents=4, ff_mult=2)


def test_default_is_the_openflamingo_perceiver_unchanged():
    cfg = ModelConfig(perceiver=PERCEIVER)
    assert cfg.resampler == "perceiver" and cfg.perceiver.latent_init_std == 1.0
    torch.manual_seed(0)
    built = build_resampler(16, cfg)
    torch.manual_seed(0)
    ref = PerceiverResampler(16, PERCEIVER)
    assert type(built) is PerceiverResampler
    ours, theirs = built.state_dict(), ref.state_dict()
    assert list(ours) == list(theirs)  # the released checkpoints' names (perceiver.<name>)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # the same init, draw for draw
    torch.manual_seed(1)
    ref_latents = torch.randn(4, 16)
    torch.manual_seed(1)
    assert torch.equal(PerceiverResampler(16, PERCEIVER).latents, ref_latents)  # torch.randn, as OpenFlamingo
    media = torch.randn(2, 3, 5, 16)
    assert built(media).shape == (2, 3, 4, 16)


def test_latent_init_std_scales_the_latents_only():
    torch.manual_seed(0)
    small = PerceiverResampler(16, PerceiverConfig(**{**PERCEIVER.__dict__, "latent_init_std": 0.02}))
    torch.manual_seed(0)
    ref = PerceiverResampler(16, PERCEIVER)
    torch.testing.assert_close(small.latents, ref.latents * 0.02)
    assert all(torch.equal(a, b) for (n, a), (_, b) in zip(small.state_dict().items(), ref.state_dict().items())
               if n != "latents")


def test_none_resampler_is_the_normalised_tokens():
    built = build_resampler(16, ModelConfig(resampler="none"))
    assert isinstance(built, TokenNorm)
    assert [n for n, _ in built.named_parameters()] == ["norm.weight", "norm.bias"]
    media = torch.randn(2, 3, 5, 16) * 7 + 2
    out = built(media)
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(media, (16,)))
    assert out.shape == media.shape
    with pytest.raises(ValueError, match="model.resampler"):
        build_resampler(16, ModelConfig(resampler="linear"))
