"""Media-indexed cross-attention: forward + backward time of every implementation, side by side.

Shapes: B batch, H heads, T text tokens, M media (images) per sample, N latents per image,
K head dim. OpenFlamingo's cross-attention: H = 8, K = 64, N = 64 latents per image,
T in {256, 2048}, M in {1, 6, 33}; two layouts of the images in the sequence (the first at t = 0
in both): "even" spreads them evenly (text_time is a regular staircase), "irregular" puts them at
seeded random positions (runs of every length, some images back to back), as real interleaved
documents have them. The gather's cost must not depend on the layout.

Implementations (all compute the same output, checked against the gather reference):
- dense:     `media_attention_dense`, the (T, M * N) masked score matrix OpenFlamingo builds;
- gather:    `media_attention_gather`, one chunk of tokens per image, images cut into segments of
             equal chunk length, six batched matmuls per segment reading the keys in place, one
             autograd node with a hand-written backward (M = 1: one fused SDPA call); its index
             plan (`layout.plan_for`) is built on the first (untimed) call and reused, as every
             cross-attention layer of a batch and its backward reuse it in the model;
- gather+plan: the same, building the plan inside every timed call (`layout.chunk_plan`): the cost
             for a model with a single cross-attention layer (M = 1 needs no plan);
- sdpa_mask: `scaled_dot_product_attention` over all M * N keys with a dense boolean mask;
- triton:    the Triton kernels through `media_attention(impl="triton")` (CUDA only).

Metrics: milliseconds for forward + backward (median); TFLOP/s over the *useful* work, FA
convention (forward 4 * B * H * T * N * K for the N keys each token attends to, backward 2.5x);
GB/s over the minimum traffic (q, o read/written 6 times in total, k, v 6 times: inputs and
outputs of forward and backward once each); speedups over dense and over sdpa_mask.

Usage:
    python benchmarks/xattn.py                  # CUDA if available (bf16), else CPU (fp32)
    python benchmarks/xattn.py --quick          # T = 256 only, fewer repeats
    python benchmarks/xattn.py --json out.json  # also write the table, device and versions
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from megaflamingo.kernels.xattn import media_attention, media_attention_dense, media_attention_gather, triton_available
from megaflamingo.kernels.xattn.layout import chunk_plan

HEADS, HEAD_DIM, LATENTS = 8, 64, 64


def staircase_text_time(batch: int, num_tokens: int, num_media: int, device: torch.device) -> torch.Tensor:
    """(B, T) text_time with M <image> markers spread evenly, the first at t = 0."""
    markers = torch.zeros(num_tokens, dtype=torch.long)
    for j in range(num_media):
        markers[(j * num_tokens) // num_media] += 1
    return markers.cumsum(0).expand(batch, num_tokens).contiguous().to(device)


def irregular_text_time(batch: int, num_tokens: int, num_media: int, device: torch.device,
                        seed: int = 0) -> torch.Tensor:
    """(B, T) text_time with M <image> markers at seeded random distinct positions, the first at t = 0."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        markers = torch.zeros(num_tokens, dtype=torch.long)
        markers[0] = 1
        markers[torch.randperm(num_tokens - 1, generator=gen)[:num_media - 1] + 1] = 1
        rows.append(markers.cumsum(0))
    return torch.stack(rows).to(device)


LAYOUTS = {"even": staircase_text_time, "irregular": irregular_text_time}


def sdpa_dense_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor) -> torch.Tensor:
    """SDPA over all M * N keys with a boolean (B, 1, T, M * N) mask (every token here has a key)."""
    B, M, H, N, K = k.shape
    k_all = k.permute(0, 2, 1, 3, 4).reshape(B, H, M * N, K)  # (B, H, M*N, K)
    v_all = v.permute(0, 2, 1, 3, 4).reshape(B, H, M * N, K)
    key_media = torch.arange(1, M + 1, device=q.device).repeat_interleave(N)  # (M*N,)
    mask = text_time[:, None, :, None] == key_media  # (B, 1, T, M*N)
    return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)


def gather_with_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor) -> torch.Tensor:
    """The gather with its index plan built in this call (not reused from an earlier one; M = 1
    needs none)."""
    plan = chunk_plan(text_time, k.shape[1]) if k.shape[1] > 1 else None
    return media_attention_gather(q, k, v, text_time, plan)


def triton_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor) -> torch.Tensor:
    """The Triton forward / backward kernels (ungated, like the other rows)."""
    return media_attention(q, k, v, text_time, impl="triton")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fwd_bwd(impls: dict, q, k, v, text_time, dout, warmup: int, repeats: int) -> dict:
    """Median milliseconds of forward + backward (grads of q, k, v) per implementation, and outputs.

    The implementations take turns within each repeat, so a shared machine's load drifts over
    all of them alike.
    """
    def step(fn):
        out = fn(q, k, v, text_time)
        torch.autograd.grad(out, (q, k, v), dout)
        return out.detach()

    outputs = {name: step(fn) for name, fn in impls.items()}
    for _ in range(warmup):
        for fn in impls.values():
            step(fn)
    times = {name: [] for name in impls}
    for _ in range(repeats):
        for name, fn in impls.items():
            sync(q.device)
            start = time.perf_counter()
            step(fn)
            sync(q.device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: (statistics.median(times[name]), outputs[name]) for name in impls}


def run_shape(impls: dict, B: int, T: int, M: int, dtype: torch.dtype, device: torch.device,
              warmup: int, repeats: int) -> list[dict]:
    """One row per implementation and layout at shape (B, T, M) (both layouts timed in turns)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, HEADS, T, HEAD_DIM, generator=gen).to(device, dtype).requires_grad_()
    k = torch.randn(B, M, HEADS, LATENTS, HEAD_DIM, generator=gen).to(device, dtype).requires_grad_()
    v = torch.randn(B, M, HEADS, LATENTS, HEAD_DIM, generator=gen).to(device, dtype).requires_grad_()
    dout = torch.randn(B, HEADS, T, HEAD_DIM, generator=gen).to(device, dtype)
    text_times = {name: make(B, T, M, device) for name, make in LAYOUTS.items()}

    flops = 3.5 * 4 * B * HEADS * T * LATENTS * HEAD_DIM
    traffic = dtype.itemsize * 6 * (q.numel() + k.numel())
    cases = {(layout, name): (lambda fn, tt: lambda q, k, v, _: fn(q, k, v, tt))(fn, text_times[layout])
             for layout in LAYOUTS for name, fn in impls.items()}
    timed = time_fwd_bwd(cases, q, k, v, None, dout, warmup, repeats)
    rows = []
    for (layout, name), (ms, out) in timed.items():
        expected = timed[(layout, "gather")][1].float()
        rows.append({
            "T": T, "M": M, "B": B, "layout": layout, "impl": name, "ms": ms,
            "tflops": flops / ms / 1e9, "gbps": traffic / ms / 1e6,
            "x_dense": timed[(layout, "dense")][0] / ms, "x_sdpa": timed[(layout, "sdpa_mask")][0] / ms,
            "vs_even": ms / timed[("even", name)][0],
            "max_abs_err_vs_gather": (out.float() - expected).abs().max().item(),
        })
    return rows


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """Device, versions, threads and date for the record."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    triton_version = None
    if triton_available():
        import triton

        triton_version = triton.__version__
    return {
        "device": f"{device.type}: {name}", "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def format_table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    head = "| T | M | layout | impl | ms | TFLOP/s | GB/s | x dense | x sdpa_mask | / even | max err |"
    lines = [head, "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['T']} | {r['M']} | {r['layout']} | {r['impl']} | {r['ms']:.2f} | {r['tflops']:.3f} "
                     f"| {r['gbps']:.2f} | {r['x_dense']:.2f} | {r['x_sdpa']:.2f} | {r['vs_even']:.2f} "
                     f"| {r['max_abs_err_vs_gather']:.1e} |")
    return "\n".join(lines)


def targets(rows: list[dict], device: torch.device) -> list[str]:
    """DESIGN.md section 7's cross-attention targets, as measured in this run."""
    out = []
    for r in rows:
        if device.type == "cpu" and r["impl"].startswith("gather") and r["M"] in (1, 33):
            goal = ">= 10x" if r["M"] == 33 else ">= 1x"
            out.append(f"CPU {r['impl']} vs dense, T={r['T']} M={r['M']} {r['layout']}: {r['x_dense']:.1f}x (target {goal})"
                       + (f"; {r['vs_even']:.2f}x its even-layout time (target <= 1.2x)" if r["layout"] == "irregular"
                          else ""))
        if device.type == "cuda" and r["impl"] == "triton":
            out.append(f"GPU triton vs sdpa_mask, T={r['T']} M={r['M']}: {r['x_sdpa']:.2f}x (target >= 1.5x); "
                       f"{r['gbps']:.0f} GB/s of minimum traffic")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on CUDA, 1 on CPU")
    parser.add_argument("--seq", type=int, nargs="+", default=None, help="T values (default 256 2048)")
    parser.add_argument("--media", type=int, nargs="+", default=[1, 6, 33], help="M values")
    parser.add_argument("--repeats", type=int, default=None, help="default: 30 on CUDA, 5 on CPU")
    parser.add_argument("--quick", action="store_true", help="T = 256 only and fewer repeats")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    batch = args.batch or (8 if cuda else 1)
    seqs = args.seq or ([256] if args.quick else [256, 2048])
    repeats = args.repeats or ((10 if args.quick else 30) if cuda else (3 if args.quick else 5))
    warmup = 5 if cuda else 1
    impls = {"gather": media_attention_gather, "gather+plan": gather_with_plan, "dense": media_attention_dense,
             "sdpa_mask": sdpa_dense_mask}
    if cuda and triton_available():
        impls["triton"] = triton_kernel

    env = environment(device, dtype)
    print(" ".join(f"{key}={val}" for key, val in env.items()))
    print(f"B={batch} H={HEADS} K={HEAD_DIM} N={LATENTS} warmup={warmup} repeats={repeats} (median)")
    rows = []
    for T in seqs:
        for M in args.media:
            rows += run_shape(impls, batch, T, M, dtype, device, warmup, repeats)
    print(format_table(rows))
    for line in targets(rows, device):
        print(line)
    if args.json:
        config = {"B": batch, "H": HEADS, "K": HEAD_DIM, "N": LATENTS, "warmup": warmup, "repeats": repeats}
        with open(args.json, "w") as f:
            json.dump({"environment": env, "config": config, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
