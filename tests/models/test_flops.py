"""Analytic FLOPs (`megaflamingo.models.flops`) against a measured training step and the worked example.

The measurement is `torch.utils.flop_counter.FlopCounterMode` over forward + loss + backward of
`build_model`'s model. Two settings make every matmul visible to it: SDPA's math backend (the CPU
flash kernel is not in its formula registry) and no nn.MultiheadAttention fast path (the vision
tower's fused op is not either). The math backend computes the whole causal score matrix, so the
analytic side uses causal="full" here.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megaflamingo.config import LMConfig, ModelConfig, VisionConfig
from megaflamingo.models.flamingo import build_model
from megaflamingo.models.flops import count_flops
from tests.models.test_flamingo import MEDIA, tiny_config as flamingo_tiny_config



def tiny_config(family: str, every_n: int = 2, **changes) -> ModelConfig:
    """test_flamingo's tiny model, with a narrower MLP and GQA for LLaMA."""
    lm = dict(num_kv_heads=2, intermediate_size=96) if family == "llama" else {}
    return dataclasses.replace(flamingo_tiny_config(family, every_n, **lm), **changes)


def measure_step(cfg: ModelConfig, B: int, T: int, M: int, first_image: int = 0) -> tuple[int, int]:
    """(total, vision) FLOPs FlopCounterMode counts for one training step of build_model(cfg)."""
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, 240, (B, T))
    ids[:, [first_image + k * (T - first_image) // M for k in range(M)]] = MEDIA
    images = torch.randn(B, M, 1, 3, 32, 32)
    counter = FlopCounterMode(display=False)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH), counter:
            logits = model(images, ids)
            F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    # the vision tower runs inside the MediaEncoder view (models.fusion), which names its scope
    vision = sum(counter.get_flop_counts()["MediaEncoder.vision"].values())
    return counter.get_total_flops(), vision


CASES = {
    "llama-gqa": tiny_config("llama"),
    "llama-tied-every1": tiny_config("llama", every_n=1, lm=LMConfig(
        family="llama", vocab_size=256, hidden_size=64, num_layers=3, num_heads=4, tie_word_embeddings=True)),
    "mpt": tiny_config("mpt", lm=LMConfig(family="mpt", vocab_size=256, hidden_size=64, num_layers=4,
                                          num_heads=4, tie_word_embeddings=True)),
    "gpt_neox": tiny_config("gpt_neox", every_n=4),
    # layers 0..2 sit below the first block and see no gradient: forward only
    "llama-frozen-embeddings": tiny_config("llama", every_n=4, freeze_lm_embeddings=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_analytic_flops_match_a_measured_training_step(name):
    cfg = CASES[name]
    B, T, M = 2, 32, 3
    measured, measured_vision = measure_step(cfg, B, T, M)
    analytic = count_flops(cfg, T, M, causal="full")
    assert measured == pytest.approx(B * analytic.true, rel=0.05)
    assert measured_vision == pytest.approx(B * analytic["vision"].total, rel=0.05)


def test_text_before_the_first_image_skips_cross_attention_cores():
    cfg = CASES["llama-gqa"]
    B, T, M, first = 2, 32, 2, 12
    measured, _ = measure_step(cfg, B, T, M, first_image=first)
    analytic = count_flops(cfg, T, M, causal="full", attending_tokens=T - first)
    assert measured == pytest.approx(B * analytic.true, rel=0.05)
    assert analytic["xattn"].attn_fwd < count_flops(cfg, T, M, causal="full")["xattn"].attn_fwd


def test_frozen_embeddings_take_the_lower_layers_off_the_gradient_path():
    open_ = count_flops(CASES["llama-gqa"], 32, 2)
    frozen = count_flops(dataclasses.replace(CASES["llama-gqa"], freeze_lm_embeddings=True), 32, 2)
    below = frozen["lm_layers_off_path"]  # every_n = 2: layer 0 only
    assert below.matmul_bwd == below.attn_bwd == 0 and below.params == open_["lm_layers"].params // 4
    assert frozen.true < open_.true and frozen.forward == open_.forward


def test_conventions_recompute_and_causal_halving():
    cfg = CASES["llama-gqa"]
    half, full = count_flops(cfg, 32, 2), count_flops(cfg, 32, 2, causal="full")
    assert full["lm_layers"].attn_fwd == 2 * half["lm_layers"].attn_fwd
    assert full["vision"].attn_fwd == half["vision"].attn_fwd  # non-causal cores are never halved
    again = count_flops(cfg, 32, 2, recompute=True)
    assert again.true == half.true
    assert again.hardware - half.true == pytest.approx(half["lm_layers"].forward + half["xattn"].forward)
    assert half.six_n_trainable < half.true < half.six_n_all
    with pytest.raises(ValueError, match="causal"):
        count_flops(cfg, 32, 2, causal="quarter")


def openflamingo_9b() -> ModelConfig:
    """perf_anchors Appendix A: MPT-7B (tied, 50,280 rows), ViT-L/14, xattn every 4th layer."""
    return ModelConfig(
        vision=VisionConfig(open_clip_model="ViT-L-14-quickgelu"),
        lm=LMConfig(family="mpt", vocab_size=50280, hidden_size=4096, num_layers=32, num_heads=32,
                    tie_word_embeddings=True),
        cross_attn_every_n_layers=4,
    )


# perf_anchors §1.3 table, TFLOP per sample: (T, M) -> LM fwd+dgrad matmuls (layers + head),
# xattn 6N matmuls, perceiver 6N matmuls, ViT forward (with its attention core), true total (all
# attention cores included), trainable-only 6N, 6N over all parameters. Causal LM attention halved
# (Megatron convention, §9).
WORKED_EXAMPLE = {
    (256, 6): (6.81, 1.72, 0.20, 0.97, 9.76, 1.92, 14.7),
    (256, 2): (6.81, 1.71, 0.07, 0.32, 8.96, 1.78, 12.8),
    (32, 1): (0.85, 0.22, 0.03, 0.16, 1.26, 0.25, 1.96),
}


@pytest.mark.parametrize("shape", list(WORKED_EXAMPLE))
def test_openflamingo_9b_worked_example(shape):
    f = count_flops(openflamingo_9b(), *shape)
    lm = f["lm_layers"].matmul_fwd + f["lm_layers"].matmul_bwd + f["lm_head"].total
    six_n = lambda c: c.matmul_fwd + c.matmul_bwd  # noqa: E731
    got = (lm, six_n(f["xattn"]), six_n(f["perceiver"]), f["vision"].total, f.true, f.six_n_trainable,
           f.six_n_all)
    for value, expected in zip(got, WORKED_EXAMPLE[shape]):
        # the table rounds to 0.01 TF: allow 2% or half a unit of the last digit, whichever is larger
        assert value / 1e12 == pytest.approx(expected, rel=0.02, abs=0.006)
    assert f.true / 1e12 == pytest.approx(WORKED_EXAMPLE[shape][4], rel=0.005)
