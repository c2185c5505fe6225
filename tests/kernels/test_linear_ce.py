"""Fused linear + cross entropy against the plain loss: values, gradients, memory, Triton, TP.

The plain loss is `flamingo_loss(head(hidden), labels, loss_weight)` (full fp32 logits, autograd).
The fused one must give the same loss and the same gradients w.r.t. the hidden states, the head
weight and a tied head's trainable added rows, in fp32, for every chunk length, and never create
a tensor of (tokens x V) elements. Triton tests run in the interpreter on CPU (this module sets
TRITON_INTERPRET=1 before importing triton; when triton was imported earlier in the process they
skip and `test_triton_tests_in_fresh_process` reruns them). The tensor-parallel test shards the
vocabulary over 2 gloo ranks and compares with the single-process loss.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from megaflamingo.kernels.linear_ce import linear_cross_entropy, triton_available  # noqa: E402
from megaflamingo.models.decoder import LMHead  # noqa: E402
from megaflamingo.models.embedding import TokenEmbedding  # noqa: E402
from megaflamingo.training.loss import flamingo_loss, fused_flamingo_loss, head_loss  # noqa: E402

kt = importlib.import_module("megaflamingo.kernels.linear_ce.triton") if triton_available() else None
STALE_TRITON = kt is not None and not torch.cuda.is_available() and not kt.interpreter_ready()
needs_triton = pytest.mark.skipif(kt is None or STALE_TRITON, reason="triton missing, or imported before "
                                  "TRITON_INTERPRET=1 was set (test_triton_tests_in_fresh_process runs these)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {"rtol": 2e-5, "atol": 1e-6}


def make_case(tied: bool, weight_trainable: bool, seed: int = 0, B: int = 3, T: int = 11, D: int = 16, V: int = 53):
    """(head projection, hidden (B, T, D), labels, loss_weight): rows with ignored tokens, a row
    without any target, uneven loss weights; a tied head has two trainable added rows."""
    torch.manual_seed(seed)
    if tied:
        proj = TokenEmbedding(V, D, trainable_ids=[7, V - 1])
    else:
        proj = nn.Linear(D, V, bias=False)
    proj.weight.requires_grad_(weight_trainable)
    hidden = torch.randn(B, T, D, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[0, 2:5] = -100
    labels[1, T - 2] = V - 1  # an added token as a target
    labels[B - 1, 1:] = -100  # a sample without targets
    loss_weight = torch.tensor([1.0, 0.25, 2.0, 0.5])[:B]
    return proj, hidden, labels, loss_weight


def plain_and_fused(proj, hidden, labels, loss_weight, **kwargs):
    """(loss, grads) of the plain and the fused loss w.r.t. hidden and every trainable head tensor."""
    tied = isinstance(proj, TokenEmbedding)
    params = [p for p in (proj.weight, getattr(proj, "added", None)) if p is not None and p.requires_grad]
    plain = flamingo_loss(proj.attend(hidden) if tied else proj(hidden), labels, loss_weight)
    added = proj.added if tied else None
    fused = fused_flamingo_loss(hidden, proj.weight, labels, loss_weight, added=added,
                                added_ids=proj.trainable_ids if tied else None, **kwargs)
    return [(loss, torch.autograd.grad(loss, [hidden, *params])) for loss in (plain, fused)]


@pytest.mark.parametrize("tied,weight_trainable", [(True, False), (True, True), (False, True), (False, False)])
@pytest.mark.parametrize("chunk", [1, 5, None])
def test_fused_matches_plain_loss(tied, weight_trainable, chunk):
    (loss, grads), (f_loss, f_grads) = plain_and_fused(*make_case(tied, weight_trainable), chunk_tokens=chunk,
                                                       impl="reference")
    torch.testing.assert_close(f_loss, loss, **TOL)
    assert len(f_grads) == len(grads) == 1 + weight_trainable + tied
    for g, ref in zip(f_grads, grads):
        torch.testing.assert_close(g, ref, **TOL)


def test_head_loss_and_no_loss_weight():
    """head_loss reads norm, weight and added rows off an LMHead; loss_weight None = all ones."""
    proj, hidden, labels, _ = make_case(tied=True, weight_trainable=False)
    head = LMHead(nn.LayerNorm(hidden.shape[-1]), proj, tied=True)
    plain = flamingo_loss(head(hidden), labels)
    fused = head_loss(head, hidden, labels, chunk_tokens=4)
    torch.testing.assert_close(fused, plain, **TOL)
    wrt = [hidden, proj.added, head.norm.weight]
    for g, ref in zip(torch.autograd.grad(fused, wrt), torch.autograd.grad(plain, wrt)):
        torch.testing.assert_close(g, ref, **TOL)


def test_no_grad_computes_the_loss_only():
    proj, hidden, labels, loss_weight = make_case(tied=True, weight_trainable=True)
    with torch.no_grad():
        plain = flamingo_loss(proj.attend(hidden), labels, loss_weight)
        fused = fused_flamingo_loss(hidden, proj.weight, labels, loss_weight, added=proj.added,
                                    added_ids=proj.trainable_ids)
    torch.testing.assert_close(fused, plain, **TOL)
    assert fused.grad_fn is None


class _LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an op creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_all_logits():
    B, T, D, V, chunk = 3, 32, 8, 300, 8
    proj, hidden, labels, loss_weight = make_case(True, False, B=B, T=T, D=D, V=V)
    with _LargestTensor() as mode:
        loss = fused_flamingo_loss(hidden, proj.weight, labels, loss_weight, added=proj.added,
                                   added_ids=proj.trainable_ids, chunk_tokens=chunk)
        loss.backward()
    assert mode.largest <= chunk * V < B * T * V


def test_default_chunks_hold_at_least_256_rows():
    """With a vocabulary whose 16 MiB chunk would be 128 rows, the default chunk is 256 rows (the
    head's matmuls re-read the whole weight per chunk); over 4 chunks the loss and gradients are
    the plain loss's."""
    from megaflamingo.kernels.linear_ce import CHUNK_MIN_ROWS, default_chunk_tokens

    B, T, D, V = 3, 400, 8, 32768  # ~790 target rows (the last sample has none)
    assert default_chunk_tokens(V) == CHUNK_MIN_ROWS == 256 and default_chunk_tokens(1000) == 4194
    proj, hidden, labels, loss_weight = make_case(False, False, B=B, T=T, D=D, V=V)
    with _LargestTensor() as mode:
        fused = fused_flamingo_loss(hidden, proj.weight, labels, loss_weight)
        grad = torch.autograd.grad(fused, hidden)[0]
    assert mode.largest == 256 * V  # the chunk buffer: 256 rows, not 128 and not all B * T
    plain = flamingo_loss(proj(hidden), labels, loss_weight)
    torch.testing.assert_close(fused, plain, **TOL)
    torch.testing.assert_close(grad, torch.autograd.grad(plain, hidden)[0], **TOL)


@pytest.mark.parametrize("chunk", [7, None])
def test_whole_vocabulary_is_torch_cross_entropy_bit_for_bit(chunk):
    """One rank, whole vocabulary: the summed token losses are exactly those of torch's linear +
    cross_entropy (reduction "sum"), as OpenFlamingo computes them; dL/dhidden is autograd's up to
    fp32 rounding (log_softmax's backward kernel has its own exp: dL/dz differs by <= 1 ulp)."""
    torch.manual_seed(0)
    N, D, V = 40, 16, 301
    weight, hidden = torch.randn(V, D), torch.randn(N, D, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    targets[::5] = -100
    fused = linear_cross_entropy(hidden, weight, targets, torch.ones(N), chunk_tokens=chunk)
    (dh,) = torch.autograd.grad(fused, hidden)
    keep = targets != -100
    h = hidden.detach()[keep].requires_grad_()
    plain = nn.functional.cross_entropy(h @ weight.t(), targets[keep], reduction="none").sum()
    (dh_plain,) = torch.autograd.grad(plain, h)
    assert torch.equal(fused, plain)  # one sum over the same token losses, for any chunk length
    torch.testing.assert_close(dh[keep], dh_plain, rtol=1e-5, atol=1e-6)
    assert not dh[~keep].any()


def test_bad_arguments_raise():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    t, s = torch.zeros(4, dtype=torch.long), torch.ones(4)
    with pytest.raises(ValueError, match="impl"):
        linear_cross_entropy(h, w, t, s, impl="cuda")
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(h, w[:, :4], t, s)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, t[:3], s)
    with pytest.raises(ValueError, match="added_ids"):
        linear_cross_entropy(h, w, t, s, added=torch.randn(2, 8))
    with pytest.raises(ValueError, match="bias"):
        head_loss(LMHead(nn.Identity(), nn.Linear(8, 10), tied=False), h[None], t[None])


@needs_triton
@pytest.mark.parametrize("tied", [True, False])
def test_triton_matches_reference(tied):
    """The Triton row kernels (V = 53 over a 64-wide block, and V = 5000 over two blocks) give the
    reference's loss and gradients."""
    for V in (53, 5000):
        proj, hidden, labels, loss_weight = make_case(tied, True, B=3, T=5, V=V)
        proj, hidden = proj.to(DEVICE), hidden.detach().to(DEVICE).requires_grad_()
        labels, loss_weight = labels.to(DEVICE), loss_weight.to(DEVICE)
        (_, _), (ref, ref_grads) = plain_and_fused(proj, hidden, labels, loss_weight, chunk_tokens=3,
                                                   impl="reference")
        (_, _), (out, grads) = plain_and_fused(proj, hidden, labels, loss_weight, chunk_tokens=3, impl="triton")
        torch.testing.assert_close(out, ref, **TOL)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, **TOL)


@pytest.mark.skipif(kt is None, reason="triton is not installed")
def test_kernels_compile_for_sm90():
    code = "from megaflamingo.kernels.linear_ce.triton import compile_for_gpu\nprint(sorted(compile_for_gpu()))\n"
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "_grad_kernel" in proc.stdout, proc.stderr[-4000:]


@pytest.mark.skipif(not STALE_TRITON, reason="the Triton tests ran in this process")
def test_triton_tests_in_fresh_process():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton_matches"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0 and " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-4000:]


def _tensor_parallel_rank(rank: int, world: int) -> dict:
    """Vocabulary sharded over the group (uneven shards, an added row on each rank) vs this rank's
    own single-process loss; returns the max differences."""
    import torch.distributed as dist

    from megaflamingo.parallel.layers import shard_bounds

    group = dist.new_group(list(range(world)))
    out = {}
    for tied in (True, False):
        proj, hidden, labels, loss_weight = make_case(tied, True, V=53)
        (loss, grads), _ = plain_and_fused(proj, hidden, labels, loss_weight, impl="reference")
        start, end = shard_bounds(53, rank, world)
        weight = proj.weight.detach()[start:end].clone().requires_grad_()
        added = proj.added if tied else None
        h = hidden.detach().clone().requires_grad_()
        fused = fused_flamingo_loss(h, weight, labels, loss_weight, vocab_group=group, vocab_start=start,
                                    added=added, added_ids=proj.trainable_ids if tied else None, chunk_tokens=4)
        wrt = [h, weight] + ([added] if tied else [])
        f_grads = torch.autograd.grad(fused, wrt)
        diffs = [(fused - loss).abs(), (f_grads[0] - grads[0]).abs().max(),
                 (f_grads[1] - grads[1][start:end]).abs().max()]
        if tied:
            diffs.append((f_grads[2] - grads[2]).abs().max())
        out[tied] = [float(d) for d in diffs]
    return out


def test_vocab_parallel_matches_single_process():
    from tests.parallel.harness import run_ranks

    for rank_diffs in run_ranks(_tensor_parallel_rank, 2):
        for tied, diffs in rank_diffs.items():
            assert max(diffs) < 1e-5, (tied, diffs)
