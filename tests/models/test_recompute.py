"""Exact recompute in the feed-forwards: the same outputs and bit-identical gradients as plain
autograd, fewer saved bytes, and the plain path wherever the recomputing one does not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import megaflamingo.models.recompute as recompute
from megaflamingo.config import LMConfig
from megaflamingo.models.decoder import MLP
from megaflamingo.models.flamingo import build_model
from megaflamingo.models.perceiver import FeedForward
from tests.models.test_flamingo import batch, tiny_config


class SavedBytes:
    """Bytes of the distinct storages autograd saves inside the context (parameters excluded)."""

    def __init__(self, exclude: list[torch.Tensor]) -> None:
        self.skip = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.skip:
            self.storages[ptr] = t.untyped_storage().nbytes()
        return t

    def __enter__(self) -> "SavedBytes":
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def _plain_ff(ff: FeedForward, x: torch.Tensor) -> torch.Tensor:
    return ff.down(F.gelu(ff.up(ff.norm(x))))


def _plain_mlp(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    return mlp.down_proj(mlp.act(mlp.gate_proj(x)) * mlp.up_proj(x))


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return list(torch.autograd.grad(out, inputs, dy))


def _random_ff(dim: int = 48, mult: int = 4) -> FeedForward:
    ff = FeedForward(dim, mult)
    with torch.no_grad():  # non-trivial norm parameters
        ff.norm.weight.normal_(1.0, 0.3)
        ff.norm.bias.normal_(0.0, 0.3)
    return ff


@pytest.mark.parametrize("shape", [(2, 3, 8, 48), (2, 37, 48), (5, 48)])
def test_feed_forward_is_bit_identical_and_saves_less(shape):
    torch.manual_seed(0)
    ff = _random_ff()
    x = torch.randn(shape, requires_grad=True)
    params = list(ff.parameters())
    with SavedBytes(params) as fast:
        out = ff(x)
    assert type(out.grad_fn).__name__ == "FeedForwardFunctionBackward"
    with SavedBytes(params) as plain:
        ref = _plain_ff(ff, x)
    assert torch.equal(out, ref)
    for got, want in zip(_grads(out, [x, *params]), _grads(ref, [x, *params]), strict=True):
        assert torch.equal(got, want)
    # saved: x, h (4x) and two row statistics, not LN(x) and GELU(h) too
    assert fast.total < 0.6 * plain.total


def test_feed_forward_with_a_frozen_part_and_an_input_without_grad():
    torch.manual_seed(0)
    ff = _random_ff()
    ff.norm.requires_grad_(False)
    x = torch.randn(3, 7, 48, requires_grad=True)
    trainable = [x, ff.up.weight, ff.down.weight]
    assert all(torch.equal(a, b) for a, b in zip(_grads(ff(x), trainable), _grads(_plain_ff(ff, x), trainable)))
    ff.norm.requires_grad_(True)
    latents = torch.randn(3, 7, 48)  # no grad: the plain path (nothing to save for x)
    assert ff(latents).grad_fn.name() != "FeedForwardFunctionBackward"


def _llama_mlp() -> MLP:
    mlp = MLP(LMConfig(family="llama", vocab_size=64, hidden_size=40, num_layers=1, num_heads=4,
                       intermediate_size=72))
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0.0, 0.1)
    return mlp.requires_grad_(False)


def test_frozen_swiglu_is_bit_identical_and_saves_less():
    torch.manual_seed(0)
    mlp = _llama_mlp()
    x = torch.randn(2, 33, 40, requires_grad=True)
    params = list(mlp.parameters())
    with SavedBytes(params) as fast:
        out = mlp(x)
    assert type(out.grad_fn).__name__ == "FrozenSwiGLUFunctionBackward"
    with SavedBytes(params) as plain:
        ref = _plain_mlp(mlp, x)
    assert torch.equal(out, ref)
    (got,), (want,) = _grads(out, [x]), _grads(ref, [x])
    assert torch.equal(got, want)
    assert fast.total == 2 * plain.total // 3  # gate(x) and up(x), not silu(gate(x))


class Subclassed(nn.Linear):
    """Stands for a layer the recomputing path must not bypass (a tensor-parallel Linear's forward)."""


def _names(out: torch.Tensor) -> str:
    return type(out.grad_fn).__name__


def test_the_plain_path_wherever_recompute_does_not_apply():
    torch.manual_seed(0)
    ff, mlp = _random_ff(), _llama_mlp()
    x, h = torch.randn(4, 48, requires_grad=True), torch.randn(4, 40, requires_grad=True)
    with torch.no_grad():
        assert ff(x).grad_fn is None and mlp(h).grad_fn is None
    mlp.up_proj.weight.requires_grad_(True)  # a trainable MLP: autograd's own path
    assert "FrozenSwiGLU" not in _names(mlp(h))
    mlp.requires_grad_(False)
    sub = Subclassed(48, 192, bias=False)
    sub.weight = ff.up.weight
    ff.up = sub
    assert "FeedForwardFunction" not in _names(ff(x))
    ff.up = nn.Linear(48, 192, bias=False)
    ff.up.weight.ds_id = 7  # a ZeRO-3-partitioned parameter: its module's hooks must run
    assert "FeedForwardFunction" not in _names(ff(x))
    del ff.up.weight.ds_id
    assert "FeedForwardFunction" in _names(ff(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "FeedForwardFunction" not in _names(ff(x))


def test_a_flamingo_training_step_is_bit_identical(monkeypatch):
    """Every trainable gradient of a whole model (Perceiver and cross-attention feed-forwards,
    frozen SwiGLU LM) equals the plain path's, and the recomputing path was taken."""
    torch.manual_seed(0)
    model = build_model(tiny_config(every_n=2))
    with torch.no_grad():
        for block in model.xattn.values():  # open gates: the feed-forwards matter
            block.attn_gate.fill_(0.7)
            block.ff_gate.fill_(-0.6)
    images, ids, mask = batch()
    trainable = [p for p in model.parameters() if p.requires_grad]
    taken = []
    for fn in (recompute.FeedForwardFunction, recompute.FrozenSwiGLUFunction):
        monkeypatch.setattr(fn, "apply", (lambda apply: lambda *a: taken.append(1) or apply(*a))(fn.apply))

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        loss = model(images, ids, mask).float().square().mean()
        return loss, list(torch.autograd.grad(loss, trainable))

    loss, grads = loss_and_grads()
    assert len(taken) == 2 + 2 + 4  # Perceiver depth 2, two xattn blocks, four LM layers
    monkeypatch.setattr(recompute, "recompute_usable", lambda *a: False)
    monkeypatch.setattr("megaflamingo.models.perceiver.recompute_usable", lambda *a: False)
    monkeypatch.setattr("megaflamingo.models.decoder.recompute_usable", lambda *a: False)
    ref_loss, ref_grads = loss_and_grads()
    assert len(taken) == 8  # the reference ran the plain modules
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads, strict=True))
    assert any(g.abs().sum() > 0 for g in grads)
