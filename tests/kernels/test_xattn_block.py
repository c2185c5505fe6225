"""The gated cross-attention block keeps every trainable weight on the autograd graph.

ZeRO-2/3 reduce gradients from per-parameter hooks in backward, so every rank must produce a
gradient for the same parameters, also a rank whose micro-batch has no token that attends to an
image (all text before the first image, or no image at all): to_q, to_kv and the Perceiver
latents feeding the keys and values must get a (zero) gradient there, not None.
"""

from __future__ import annotations

import pytest
import torch

from megaflamingo.config import XAttnConfig
from megaflamingo.kernels.xattn import media_attention_dense
from megaflamingo.models.cross_attention import GatedCrossAttentionBlock

B, T, M, N, D, DV = 2, 12, 3, 4, 32, 24


def make_block(heads: int = 2) -> GatedCrossAttentionBlock:
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(D, DV, XAttnConfig(heads=heads, dim_head=16), impl="reference")
    with torch.no_grad():
        block.attn_gate.fill_(0.5)
        block.ff_gate.fill_(-0.3)
    return block


@pytest.mark.parametrize("text_time", [torch.zeros(B, T, dtype=torch.long),
                                       torch.tensor([[0] * T, [0] * (T - 2) + [1, 1]])])
def test_weights_stay_on_the_graph_without_image_tokens(text_time):
    """No token (or only one sample's last tokens) attends to an image: every weight gets a gradient,
    and where no token attends at all the attention weights' gradients are exactly zero."""
    block = make_block()
    h = torch.randn(B, T, D, requires_grad=True)
    media = torch.randn(B, M, N, DV, requires_grad=True)
    block(h, media, text_time).square().sum().backward()
    for name, param in block.named_parameters():
        assert param.grad is not None, name
    assert media.grad is not None
    if not text_time.any():
        for grad in (block.to_q.weight.grad, block.to_kv.weight.grad, media.grad):
            assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("heads", [1, 2])
def test_block_matches_the_dense_mask(heads):
    """The block's attention (gather, gate in the epilogue) equals OpenFlamingo's dense masked
    attention put through the same projections: output and every gradient (fp64). The keys and
    values are strided views of the to_kv output, as in the model (with one local head, as under
    tensor parallelism, they reshape to strided views rather than copies); one long run among
    short ones makes the plan cut the images into several segments."""
    block = make_block(heads).double()
    gen = torch.Generator().manual_seed(1)
    T = 40
    h = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    media = torch.randn(B, M, N, DV, generator=gen, dtype=torch.float64)
    text_time = torch.tensor([[0, 0, 1, 2] + [3] * (T - 4), [1] * 30 + [2] * 6 + [4] * 4])

    def dense_block(h, media):
        q = block.to_q(block.norm(h)).unflatten(-1, (-1, 16)).transpose(1, 2)  # (B, H, T, K)
        k, v = block.media_kv(media)
        attn = torch.tanh(block.attn_gate) * media_attention_dense(q, k, v, text_time)
        h = h + block.to_out(attn.transpose(1, 2).flatten(-2))
        return h + torch.tanh(block.ff_gate) * block.ff(h)

    from megaflamingo.kernels.xattn.layout import plan_for

    assert len(plan_for(text_time, M).segments) > 1
    results = []
    for fn in (lambda h, m: block(h, m, text_time), dense_block):
        hh, mm = h.clone().requires_grad_(), media.clone().requires_grad_()
        out = fn(hh, mm)
        params = [hh, mm, *block.parameters()]
        results.append((out, *torch.autograd.grad(out.square().sum(), params)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
