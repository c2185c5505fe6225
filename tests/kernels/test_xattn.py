"""Media-indexed gated cross-attention: Triton kernels and dispatch against the PyTorch reference.

Without CUDA the Triton tests run in the interpreter on CPU tensors: this module sets
TRITON_INTERPRET=1 before it imports triton and the kernel module (rebuilding the kernels if they
were imported earlier). Triton builds its own jit library (tl.max, tl.sum, ...) when it is first
imported, so if another test module imported triton before this one (open_clip does), the Triton
tests here skip and `test_triton_tests_in_fresh_process` reruns them in a subprocess. With CUDA
they run natively, and the `gpu` tests add bf16/fp16 checks at larger shapes. Shapes stay tiny
for the interpreter (about 4000x slower than eager torch) but keep the GPU dot minimums (K >= 16,
16 x 16 tiles).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read by triton.jit when kernels are built

from megaflamingo.kernels.xattn import (  # noqa: E402 (after TRITON_INTERPRET)
    gated_media_attention_reference,
    media_attention,
    media_attention_dense,
    media_attention_gather,
    triton_available,
)

kt = None
if triton_available():
    kt = importlib.import_module("megaflamingo.kernels.xattn.triton")
    if kt.interpret_requested() != kt.interpreting():  # imported earlier under other settings
        kt = importlib.reload(kt)

# triton itself was imported (natively) before this module set TRITON_INTERPRET=1
STALE_TRITON = kt is not None and kt.interpreting() and not kt.interpreter_ready()
DEVICE = "cuda" if kt is not None and not kt.interpreting() else "cpu"
needs_triton = pytest.mark.skipif(
    kt is None or STALE_TRITON,
    reason="triton is not installed" if kt is None else
    "triton was imported before TRITON_INTERPRET=1 was set: test_triton_tests_in_fresh_process runs these",
)
native_gpu = pytest.mark.skipif(
    kt is None or kt.interpreting() or not torch.cuda.is_available(),
    reason="needs CUDA and triton running natively (not the interpreter)",
)


def text_time_from_markers(T: int, markers: list[int]) -> torch.Tensor:
    """(T,) cumsum of <image> markers at the given token positions."""
    flags = torch.zeros(T, dtype=torch.long)
    for t in markers:
        flags[t] += 1
    return flags.cumsum(0)


def make_inputs(B, H, T, M, N, K, markers, gate, residual, dtype=torch.float32, device=DEVICE, seed=0):
    """Random q, k, v (+ gate, residual) that require grad, and text_time from per-row markers."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, K, generator=g)
    k = torch.randn(B, M, H, N, K, generator=g)
    v = torch.randn(B, M, H, N, K, generator=g)
    res = torch.randn(B, H, T, K, generator=g) if residual else None
    tensors = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
    gate_t = None if gate is None else torch.tensor([gate], device=device, dtype=dtype, requires_grad=True)
    res_t = None if res is None else res.to(device=device, dtype=dtype).requires_grad_()
    text_time = torch.stack([text_time_from_markers(T, row) for row in markers]).to(device)
    return (*tensors, text_time, gate_t, res_t)


def run(fn, q, k, v, text_time, gate, res, seed=1):
    """Output and the gradients of (q, k, v, gate, residual) under a fixed random dout."""
    out = fn(q, k, v, text_time, gate, res)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    wrt = [t for t in (q, k, v, gate, res) if t is not None]
    return out, torch.autograd.grad(out, wrt, dout)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in fp32 (0 when both are exactly zero)."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def reference(q, k, v, text_time, gate, res):
    return media_attention(q, k, v, text_time, gate, res, impl="reference")


def triton_impl(q, k, v, text_time, gate, res):
    return media_attention(q, k, v, text_time, gate, res, impl="triton")


# (B, H, T, M, N, K, <image> positions per row, gate, residual)
CASES = {
    # text before the first image, T = 37 not a multiple of 16, N = 20 over two latent blocks,
    # row 1 with 4 <image> tokens for 3 images
    "several_images_batch2": (2, 2, 37, 3, 20, 16, [[5, 14, 30], [0, 9, 20, 25]], 0.7, True),
    "one_image": (1, 2, 24, 1, 16, 16, [[3]], None, False),
    "33_images": (1, 1, 50, 33, 16, 16, [[round(i * 50 / 33) for i in range(33)]], -0.3, True),
    "more_image_tokens_than_images": (2, 1, 20, 2, 16, 32, [[2, 5, 8], [0, 1, 2, 3]], 1e-3, False),
}


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference_fp32(case):
    B, H, T, M, N, K, markers, gate, residual = CASES[case]
    inputs = make_inputs(B, H, T, M, N, K, markers, gate, residual)
    out, grads = run(triton_impl, *inputs)
    ref_out, ref_grads = run(reference, *inputs)
    assert rel_err(out, ref_out) <= 1e-4
    names = [n for n, t in zip(("dq", "dk", "dv", "dgate", "dresidual"), (1, 1, 1, gate, residual)) if t is not None]
    for name, g, ref_g in zip(names, grads, ref_grads):
        assert rel_err(g, ref_g) <= 1e-4, name
    text_time = inputs[3]
    no_image = (text_time == 0)[:, None, :, None].expand_as(out)  # text before the first image
    expected = inputs[5] if residual else torch.zeros_like(out)
    assert torch.equal(out[no_image], expected[no_image])


@needs_triton
def test_triton_gate_zero_passes_residual_through():
    """Flamingo initialises the gate at 0: the output is the residual, and only dgate is nonzero."""
    q, k, v, text_time, gate, res = make_inputs(1, 1, 16, 2, 16, 16, [[0, 7]], 0.0, True)
    out, (dq, dk, dv, dgate, dres) = run(triton_impl, q, k, v, text_time, gate, res)
    _, ref_grads = run(reference, q, k, v, text_time, gate, res)
    assert torch.equal(out, res)
    assert torch.count_nonzero(dq) == torch.count_nonzero(dk) == torch.count_nonzero(dv) == 0
    assert rel_err(dgate, ref_grads[3]) <= 1e-4 and torch.equal(dres, ref_grads[4])


@needs_triton
def test_triton_strided_inputs_like_the_model():
    """q, k, v as the model makes them: transposed views of projections, never copied."""
    B, H, T, M, N, K = 1, 2, 20, 2, 16, 16
    gen = torch.Generator().manual_seed(3)
    q_proj = torch.randn(B, T, H * K, generator=gen).to(DEVICE).requires_grad_()
    kv_proj = torch.randn(B, M, N, 2 * H * K, generator=gen).to(DEVICE).requires_grad_()
    gate = torch.tensor([0.5], device=DEVICE, requires_grad=True)
    text_time = text_time_from_markers(T, [2, 11])[None].to(DEVICE)
    dout = torch.randn(B, H, T, K, generator=gen).to(DEVICE)
    results = []
    for impl in ("triton", "reference"):
        q = q_proj.unflatten(-1, (H, K)).transpose(1, 2)  # (B, H, T, K), strided
        k, v = (t.transpose(2, 3) for t in kv_proj.unflatten(-1, (2, H, K)).unbind(dim=3))  # (B, M, H, N, K)
        out = media_attention(q, k, v, text_time, gate, impl=impl)
        results.append((out, *torch.autograd.grad(out, (q_proj, kv_proj, gate), dout)))
    for name, a, b in zip(("out", "dq", "dkv", "dgate"), *results):
        assert rel_err(a, b) <= 1e-4, name


@needs_triton
def test_triton_bf16_upcast_path():
    """bf16 inputs (dots upcast to fp32 in the interpreter) against the fp32 reference."""
    B, H, T, M, N, K, markers, gate, residual = CASES["several_images_batch2"]
    inputs = make_inputs(B, H, T, M, N, K, markers, gate, residual, dtype=torch.bfloat16)
    out, grads = run(triton_impl, *inputs)
    fp32 = [None if t is None else t.detach().float().requires_grad_() if t.is_floating_point() else t
            for t in inputs]
    ref_out, ref_grads = run(reference, *fp32)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    assert rel_err(out, ref_out) <= 2e-2
    for g, ref_g in zip(grads, ref_grads):
        assert rel_err(g, ref_g) <= 3e-2


@pytest.mark.parametrize("seed", range(4))
def test_gather_matches_dense(seed):
    """The two references agree, outputs and gradients, on random interleavings."""
    gen = torch.Generator().manual_seed(seed)
    B, H, T, M, N, K = 3, 2, 40, 4, 8, 16
    flags = (torch.rand(B, T, generator=gen) < 0.15).long()  # some rows get more markers than M
    if seed == 2:  # regular markers: runs of equal length share one SDPA call in the gather
        flags[:] = 0
        flags[:2, ::5] = 1
        flags[2, 1::4] = 1
    flags[0, :3] = 0  # row 0: text before the first image
    if seed == 3:  # one layout for the whole batch: the gather's batched path
        flags[:] = flags[0]
    text_time = flags.cumsum(1)
    q = torch.randn(B, H, T, K, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, M, H, N, K, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, M, H, N, K, generator=gen, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(B, H, T, K, generator=gen, dtype=torch.float64)
    results = []
    for fn in (media_attention_gather, media_attention_dense):
        out = fn(q, k, v, text_time)
        results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.equal(results[0][0][0, :, :3], torch.zeros(H, 3, K, dtype=torch.float64))


def grads_vs_dense(q, k, v, text_time, plan=None, seed=0):
    """(output, dq, dk, dv) of the gather (with `plan`) and of the dense reference, same dout."""
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(q.dtype)
    results = []
    for out in (media_attention_gather(q, k, v, text_time, plan), media_attention_dense(q, k, v, text_time)):
        results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    return results


# first image of each segment, for B * M = 15 images: one segment, every image alone, a mixed cut
@pytest.mark.parametrize("starts", [None, [0], list(range(15)), [0, 2, 3, 9, 14]])
def test_segmented_gather_matches_dense_any_layout(starts):
    """Every cut of the images into segments (one segment padding every run to the longest, every
    image alone, a mixed cut, the picked one) gives the dense result, outputs and gradients, on
    irregular layouts: text before the first image, empty runs (two markers at one token), one
    long run, more markers than images."""
    from megaflamingo.kernels.xattn.layout import chunk_plan

    gen = torch.Generator().manual_seed(7)
    B, H, T, M, N, K = 3, 2, 29, 5, 6, 8
    markers = [[4, 4, 5, 20, 28], [0, 1, 2, 3, 4, 5, 6], [10]]  # row 1: 7 markers for 5 images
    text_time = torch.stack([text_time_from_markers(T, row) for row in markers])
    q, k, v = (torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
               for shape in ((B, H, T, K), (B, M, H, N, K), (B, M, H, N, K)))
    plan = chunk_plan(text_time, M, starts)
    for a, b in zip(*grads_vs_dense(q, k, v, text_time, plan)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert int(plan.real_slot.sum()) == int(plan.has_image.sum())  # one slot per token with an image
    runs = [int((row == m).sum()) for row in text_time for m in range(1, M + 1)]  # tokens per image
    for i0, i1, C, _ in plan.segments:  # a chunk holds its image's whole run
        assert C == max([1, *runs[i0:i1]])
    assert [s[0] for s in plan.segments] == (starts or [s[0] for s in plan.segments])


def brute_force_cut(runs: list[int], segment_cost: int) -> int:
    """Least cost over every cut of the runs into segments (2 ** (I - 1) cuts)."""
    I, best = len(runs), None
    for mask in range(2 ** max(I - 1, 0)):
        starts = [0] + [i + 1 for i in range(I - 1) if mask >> i & 1]
        cost = sum(segment_cost + (j - i) * max([1, *runs[i:j]]) for i, j in zip(starts, starts[1:] + [I]))
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_pick_segments_finds_the_least_cost_cut(seed):
    """The dynamic programme (with its early stop) finds a cut as cheap as the brute-force best."""
    from megaflamingo.kernels.xattn.layout import pick_segments

    gen = torch.Generator().manual_seed(seed)
    I = 1 + seed % 9
    runs = (torch.randint(0, 4, (I,), generator=gen) ** 3).tolist()  # 0, 1, 8, 27: mixed lengths
    for cost in (0, 4, 30):
        starts = pick_segments(runs, cost)
        got = sum(cost + (j - i) * max([1, *runs[i:j]]) for i, j in zip(starts, starts[1:] + [I]))
        assert starts[0] == 0 and starts == sorted(set(starts)) and got == brute_force_cut(runs, cost)
    assert pick_segments([], 4) == [] and pick_segments([8] * 40, 4) == [0]  # even: one segment


# (T, M, <image> positions per row); B = len(rows)
EDGE_LAYOUTS = {
    "one_image_one_long_run": (40, 1, [[0], [3]]),
    "no_images": (12, 0, [[], [2, 5]]),  # M = 0: markers without images read the (empty) mean: 0
    "every_run_one_token": (24, 24, [list(range(24))]),
    "text_before_the_first_image": (30, 3, [[9, 10, 25]]),
    "more_markers_than_images": (16, 2, [[0, 3, 6, 9], [15]]),
    "different_layouts_per_sample": (33, 4, [[0, 1, 2, 3], [0, 30, 31, 32], [8, 8, 8, 20], []]),
    "no_tokens": (0, 2, [[], []]),
}


@pytest.mark.parametrize("name", EDGE_LAYOUTS)
def test_gather_edge_layouts(name):
    """Layout edge cases against the dense reference in fp64: outputs and every gradient."""
    T, M, markers = EDGE_LAYOUTS[name]
    B, H, N, K = len(markers), 2, 5, 8
    gen = torch.Generator().manual_seed(3)
    text_time = torch.stack([text_time_from_markers(T, row) for row in markers])
    q, k, v = (torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
               for shape in ((B, H, T, K), (B, M, H, N, K), (B, M, H, N, K)))
    for a, b in zip(*grads_vs_dense(q, k, v, text_time)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gather_low_precision_inputs(dtype):
    """16-bit and fp32 inputs: computed in fp32, outputs and gradients in the inputs' dtypes, close
    to the fp64 dense reference."""
    T, M, markers = 40, 4, [[2, 3, 20, 21], [0, 12, 13, 39]]
    B, H, N, K = 2, 2, 6, 16
    gen = torch.Generator().manual_seed(5)
    text_time = torch.stack([text_time_from_markers(T, row) for row in markers])
    exact = [torch.randn(*shape, generator=gen, dtype=torch.float64)
             for shape in ((B, H, T, K), (B, M, H, N, K), (B, M, H, N, K))]
    low = [x.to(dtype).requires_grad_() for x in exact]
    ref = grads_vs_dense(*[x.double().detach().requires_grad_() for x in low], text_time)[1]
    got = grads_vs_dense(*low, text_time)[0]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(got, ref):
        assert a.dtype == dtype and rel_err(a, b) <= tol


@pytest.mark.parametrize("layout", ["contiguous", "token_major", "padded_rows", "expanded_dout"])
def test_gather_reads_any_input_strides(layout):
    """q and dout are gathered in place through their strides: the model's transposed (B, T, H, K)
    layout, rows padded past K (strides not multiples of K: read through a copy) and an expanded
    (stride 0) dout all give the dense result."""
    B, H, T, M, N, K = 2, 3, 20, 3, 4, 8
    gen = torch.Generator().manual_seed(11)
    text_time = torch.stack([text_time_from_markers(T, row) for row in [[0, 5, 6], [2, 19]]])
    base = {"contiguous": (B, H, T, K), "token_major": (B, T, H, K), "padded_rows": (B, H, T, K + 3),
            "expanded_dout": (B, H, T, K)}[layout]
    q = torch.randn(*base, generator=gen, dtype=torch.float64)
    q = (q.transpose(1, 2) if layout == "token_major" else q[..., :K]).requires_grad_()
    k, v = (torch.randn(B, M, H, N, K, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    results = []
    for fn in (media_attention_gather, media_attention_dense):
        out = fn(q, k, v, text_time)
        dout = torch.ones(()).expand(out.shape).to(out) if layout == "expanded_dout" else \
            torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("markers", [[[0], [0]], [[3, 9], [0]], [[5], [1, 2, 2]]])
def test_one_image_sdpa_path_matches_the_segments_and_dense(markers):
    """M = 1 runs one SDPA call over the sequence: equal to the segment path (`_ChunkAttention` with
    a plan) and to the dense reference, with text before the image and more markers than images."""
    from megaflamingo.kernels.xattn.layout import chunk_plan
    from megaflamingo.kernels.xattn.reference import _ChunkAttention

    B, H, T, M, N, K = 2, 2, 14, 1, 5, 8
    gen = torch.Generator().manual_seed(13)
    text_time = torch.stack([text_time_from_markers(T, row) for row in markers])
    q, k, v = (torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
               for shape in ((B, H, T, K), (B, M, H, N, K), (B, M, H, N, K)))
    sdpa, dense = grads_vs_dense(q, k, v, text_time)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = _ChunkAttention.apply(q, k, v, chunk_plan(text_time, M))
    segments = (out, *torch.autograd.grad(out, (q, k, v), dout))
    for a, b, c in zip(sdpa, segments, dense):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-12)
    assert not sdpa[0].transpose(1, 2)[text_time == 0].any()  # text before the image: exactly 0


def test_plan_is_built_once_per_text_time_and_cuts_segments_from_the_runs():
    """plan_for reuses the plan while the text_time tensor is alive and unmodified (every layer of
    a batch, also with another batch's plan built in between), rebuilds it after an in-place
    change; evenly spaced images make one segment without padding, a long run among short ones
    gets a segment of its own."""
    from megaflamingo.kernels.xattn.layout import plan_for, ranges_for, token_ranges

    T, M = 64, 8
    text_time = text_time_from_markers(T, list(range(0, T, T // M)))[None]
    plan = plan_for(text_time, M)
    assert plan_for(text_time, M) is plan and ranges_for(text_time, M) is ranges_for(text_time, M)
    assert plan.segments == ((0, M, T // M, 0),)  # runs of 8 tokens: chunks of 8, no padding
    assert int(plan.real_slot.sum()) == T and plan.slot_token.numel() == T
    text_time[0, -3:] = M + 1  # in place: more markers than images at the end
    rebuilt = plan_for(text_time, M)
    assert rebuilt is not plan and rebuilt.any_over
    lo, hi = ranges_for(text_time, M)
    assert torch.equal(lo.long(), token_ranges(text_time, M)[0]) and lo.dtype == torch.int32
    assert torch.equal(hi.long(), token_ranges(text_time, M)[1])
    long_run = text_time_from_markers(T, [0, 2, 4, 40, 42, 44, 46, 48])[None]  # runs 2, 2, 36, 2, 2, 2, 2, 16
    long_plan = plan_for(long_run, M)
    assert [(i0, i1) for i0, i1, _, _ in long_plan.segments] == [(0, 2), (2, 3), (3, 7), (7, 8)]
    assert plan_for(text_time, M) is rebuilt and plan_for(long_run, M) is long_plan  # two batches in turns


def test_auto_on_cpu_is_the_reference():
    q, k, v, text_time, gate, res = make_inputs(2, 2, 12, 2, 8, 16, [[0, 6], [2]], 0.5, True, device="cpu")
    expected = gated_media_attention_reference(q, k, v, text_time, gate, res)
    assert torch.equal(media_attention(q, k, v, text_time, gate, res), expected)
    assert torch.equal(media_attention(q, k, v, text_time), media_attention_gather(q, k, v, text_time))
    # an fp32 gate (a parameter) does not promote bf16 activations
    low = [t.detach().bfloat16() for t in (q, k, v)]
    assert media_attention(*low, text_time, gate, res).dtype == torch.bfloat16


def test_bad_arguments_raise():
    q, k, v, text_time, gate, res = make_inputs(1, 2, 12, 2, 8, 16, [[0]], 0.5, True, device="cpu")
    with pytest.raises(ValueError, match="impl"):
        media_attention(q, k, v, text_time, impl="cuda")
    with pytest.raises(ValueError, match="text_time"):
        media_attention(q, k, v, text_time[:, :5])
    with pytest.raises(ValueError, match="residual"):
        media_attention(q, k, v, text_time, gate, res[:, :1])
    if kt is not None:
        with pytest.raises(ValueError, match="head dim"):
            media_attention(q[..., :8], k[..., :8], v[..., :8], text_time, impl="triton")


@needs_triton
def test_triton_on_cpu_without_interpreter_raises():
    code = (
        "import torch\n"
        "from megaflamingo.kernels.xattn import media_attention\n"
        "q = torch.randn(1, 1, 4, 16); k = torch.randn(1, 1, 1, 16, 16)\n"
        "try:\n"
        "    media_attention(q, k, k, torch.ones(1, 4, dtype=torch.long), impl='triton')\n"
        "except RuntimeError as e:\n"
        "    print('RuntimeError:', e)\n"
    )
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "RuntimeError:" in proc.stdout and "TRITON_INTERPRET=1" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.skipif(kt is None, reason="triton is not installed")
def test_kernels_compile_for_sm90():
    """Every kernel compiles for H100/H200 (sm_90) with ptxas, no GPU needed: the interpreter does
    not enforce the compiler's rules (constexpr-only globals, dot shapes, operand types)."""
    code = (
        "import torch\n"
        "from megaflamingo.kernels.xattn.compile import compile_for_gpu\n"
        "for fused in (True, False):\n"
        "    print(compile_for_gpu(torch.bfloat16, 90, fused))\n"
    )
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("_bwd_dkdv_kernel") == 2


@pytest.mark.skipif(not STALE_TRITON, reason="the Triton tests ran in this process")
def test_triton_tests_in_fresh_process():
    """Rerun this module's Triton tests where TRITON_INTERPRET=1 precedes `import triton`."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
           "-k", "triton and not fresh_process", "-m", "not gpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0 and " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-4000:]


@native_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 6, 33])
def test_triton_gpu_low_precision(dtype, M):
    """Native CUDA run at OpenFlamingo-like shapes: bf16/fp16 against the fp32 reference."""
    B, H, T, N, K = 2, 8, 300, 64, 64
    markers = [[round(i * T / M) for i in range(M)], [7 + round(i * (T - 7) / (M + 1)) for i in range(M + 1)]]
    inputs = make_inputs(B, H, T, M, N, K, markers, 0.4, True, dtype=dtype, device="cuda")
    out, grads = run(triton_impl, *inputs)
    fp32 = [None if t is None else t.detach().float().requires_grad_() if t.is_floating_point() else t
            for t in inputs]
    ref_out, ref_grads = run(reference, *fp32)
    assert rel_err(out, ref_out) <= 1e-2
    for name, g, ref_g in zip(("dq", "dk", "dv", "dgate", "dresidual"), grads, ref_grads):
        assert rel_err(g, ref_g) <= 2e-2, name
