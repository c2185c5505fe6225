"""Activation memory of one micro-batch, per pipeline layer, from shapes alone.

Shapes: B micro-batch, T text tokens, M images per sample, P patch tokens per image, N latents,
D LM width, Dv vision width, F MLP width, H / G query / key-value heads, K head dim, V_l this
rank's vocabulary rows, `a` bytes per activation element (2 for bf16, 4 for fp32); `_l` sizes are
one tensor-parallel rank's share (H / tp, G / tp, F / tp).

The terms are the tensors autograd saves for the backward pass in this codebase's modules
(listed with `torch.autograd.graph.saved_tensors_hooks`); frozen linears save no input, so a
frozen decoder layer keeps only what its norms, activation function and attention core need:

| module (per token unless said)  | saved bytes                                                      |
|---------------------------------|------------------------------------------------------------------|
| decoder layer                   | n_in * D * b_norm + (2 H_l + 2 G_l) K a + 4 H_l (lse) + g F_l a   |
|                                 | + norm stats; n_in = 1 (parallel residual) or 2; b_norm = 4 for  |
|                                 | RMSNorm (normalised in fp32), a for LayerNorm; g = 3 SwiGLU, 1   |
|                                 | + padded batches: the (B, 1, T, T) mask SDPA converts, per layer |
|                                 | + ALiBi: the (B, H, T, T) bias, once per forward of a stage        |
| cross-attention block           | (5 D + 2 inner_l + 2 ff_l) a + 4 a (LN stats), and its core: per |
|                                 | query slot 2 inner_l a + 4 H_l, per (image, chunk) 2 N inner_l a |
| Perceiver (per image and layer) | (Dv (P+N) + 2 ff N + inner N + 4 N Dv) a + (4 N + 2 P) a          |
|                                 | + its SDPA core (fused kernel: q and the k/v projection in a,    |
|                                 |   the log-sum-exp in fp32): (inner N + 2 inner (P+N)) a          |
|                                 |   + 4 heads N; once: Dv P a                                      |
| head + loss (per token)         | 8 V_l (two fp32 (B, T, V_l) tensors of the cross entropy)        |
|                                 | + the final norm's input                                         |

Transients (alive at the peak, not saved): the logits while the loss runs, a V_l per token (+ 4 V_l
for their fp32 copy under bf16); under activation checkpointing one layer's full activations while it is recomputed; the
vision tower's forward (no_grad) on the first stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from megaflamingo.config import LMConfig, ModelConfig
from megaflamingo.models.flops import VisionShape


@dataclass(frozen=True)
class MicroBatch:
    """The shape of one micro-batch: B samples of T tokens and M images each."""

    batch: int
    seq_len: int
    num_media: int


def _head_dim(lm: LMConfig) -> int:
    return lm.head_dim or lm.hidden_size // lm.num_heads


def _mlp_width(lm: LMConfig) -> int:
    return lm.intermediate_size or 4 * lm.hidden_size


def lm_layer_bytes(lm: LMConfig, mb: MicroBatch, tp: int, a: int) -> float:
    """Saved bytes of one decoder layer (mask excluded for ALiBi; see `alibi_mask_bytes`)."""
    B, T, D = mb.batch, mb.seq_len, lm.hidden_size
    H, G = lm.num_heads / tp, (lm.num_kv_heads or lm.num_heads) / tp
    llama = lm.family == "llama"
    inputs = 1 if lm.family == "gpt_neox" and lm.use_parallel_residual else 2
    norm = inputs * D * (4 if llama else a) + 2 * (4 if llama else 2 * a)
    attn = (2 * H + 2 * G) * _head_dim(lm) * a + 4 * H
    mlp = (3 if llama else 1) * _mlp_width(lm) / tp * a
    per_token = norm + attn + mlp
    mask = 0.0 if lm.family == "mpt" else B * T * T * a  # padded batches: SDPA's converted mask
    return B * T * per_token + mask


def alibi_mask_bytes(lm: LMConfig, mb: MicroBatch, a: int) -> float:
    """The (B, H, T, T) ALiBi bias SDPA keeps (MPT), all heads: TP ranks slice a view of it."""
    return mb.batch * lm.num_heads * mb.seq_len**2 * a if lm.family == "mpt" else 0.0


def xattn_chunk(seq_len: int, num_media: int) -> int:
    """Query chunk C of the gather reference: the power of two nearest T / M within [4, 64]."""
    mean_run, chunk = seq_len / max(num_media, 1), 4
    while chunk < 64 and chunk * 1.5 <= mean_run:
        chunk *= 2
    return chunk


def xattn_block_bytes(cfg: ModelConfig, D: int, mb: MicroBatch, tp: int, a: int) -> float:
    """Saved bytes of one gated cross-attention block (media latents excluded: shared)."""
    B, T, M, N = mb.batch, mb.seq_len, mb.num_media, cfg.perceiver.num_latents
    x = cfg.xattn
    heads, inner, ff = x.heads / tp, x.heads * x.dim_head / tp, x.ff_mult * D / tp
    per_token = (5 * D + 2 * inner + 2 * ff) * a + 4 * a
    chunk = xattn_chunk(T, M)
    slots = B * (T + M * chunk / 2)  # each image's last chunk is half empty on average
    core = slots * (2 * inner * a + 4 * heads) + slots / chunk * 2 * N * inner * a
    return B * T * per_token + (core if M else 0.0)


def perceiver_bytes(cfg: ModelConfig, v: VisionShape, mb: MicroBatch, a: int) -> float:
    """Saved bytes of the Perceiver over the micro-batch's B * M images (replicated over tp)."""
    p, Dv, P = cfg.perceiver, v.width, v.num_patches
    N, inner, ff = p.num_latents, p.heads * p.dim_head, p.ff_mult * Dv
    # SDPA's fused CPU kernel (4-D inputs) keeps q, the k/v projection's output and the fp32
    # log-sum-exp (its output is the to_out input already counted); no score matrices
    core = (inner * N + 2 * inner * (P + N)) * a + p.heads * N * 4
    per_layer = (Dv * (P + N) + 2 * ff * N + inner * N + 4 * N * Dv) * a + core + (4 * N + 2 * P) * a
    images = mb.batch * mb.num_media
    return images * (p.depth * per_layer + Dv * P * a)


def media_bytes(cfg: ModelConfig, v: VisionShape, mb: MicroBatch, a: int) -> float:
    """The (B, M, N, Dv) media latents every cross-attention block of a stage reads."""
    return mb.batch * mb.num_media * cfg.perceiver.num_latents * v.width * a


def head_bytes(lm: LMConfig, vocab_local: int, mb: MicroBatch, a: int) -> float:
    """Saved bytes of the final norm, LM head and cross entropy (frozen head: no input saved)."""
    tokens = mb.batch * mb.seq_len
    norm = lm.hidden_size * (4 if lm.family == "llama" else a)
    return tokens * (8 * vocab_local + norm)


def head_transient_bytes(vocab_local: int, mb: MicroBatch, a: int) -> float:
    """The logits, alive while the cross entropy runs: a V_l per token, + 4 V_l for their fp32
    copy when a != 4 (the backward frees the saved fp32 tensors as it makes their gradients)."""
    return mb.batch * mb.seq_len * (a + (4 if a != 4 else 0)) * vocab_local


def vision_transient_bytes(v: VisionShape, mb: MicroBatch, a: int) -> float:
    """One ViT block's forward (no_grad) on all B * M images: tokens, qkv, MLP hidden, scores."""
    images, L = mb.batch * mb.num_media, v.num_patches + 1
    heads = max(1, v.width // 64)
    return images * (L * (5 * v.width + v.mlp_width) + heads * L * L) * a


def checkpointed_layer_bytes(D: int, mb: MicroBatch, a: int) -> float:
    """What a checkpointed decoder layer or cross-attention block keeps: its (B, T, D) input."""
    return mb.batch * mb.seq_len * D * a
