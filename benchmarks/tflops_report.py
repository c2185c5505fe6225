"""What benchmarks/tflops.py reports: per-device rates, utilisation against a known peak, the table.

FLOPs come from `megaflamingo.models.flops.count_flops` (causal self-attention halved, Megatron
convention): true TFLOP/s and MFU on the frozen-aware count, the "6N over all parameters"
convention, and HFU (with activation recompute when parallel.activation_checkpointing). MFU needs
a known peak (`PEAK_BF16_TFLOPS`, or --peak-tflops); CPU runs print TFLOP/s only.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

import torch

from megaflamingo.models.flops import StepFlops

# Dense bf16 TFLOP/s (no sparsity), matched by substring of torch.cuda.get_device_name(), first hit
# wins. Source: reference/perf_anchors.md §1.1 (stas00/ml-engineering compute/accelerator/README.md
# and NVIDIA's A100 / H100 / H200 datasheets).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0, "NVIDIA H100 PCIe datasheet (1513 with sparsity / 2)"),
    ("H100", 989.0, "NVIDIA H100 SXM datasheet (1979 with sparsity / 2)"),
    ("H200", 989.0, "NVIDIA H200 datasheet (same compute as H100 SXM)"),
    ("A100", 312.0, "NVIDIA A100 datasheet (624 with sparsity / 2)"),
)

def throughput(timing: dict, flops: StepFlops, samples_per_device: float, peak: float | None) -> dict:
    """Per-device rates and utilisations from the median step time.

    Args:
        samples_per_device: samples one device accounts for per optimizer step
            (micro-batch * accumulation / (tp * pp): a replica's devices share its samples).
    """
    rate = samples_per_device / timing["step_s"]  # samples/s/device
    tflops = {name: rate * value / 1e12 for name, value in (
        ("tflops_true", flops.true), ("tflops_6n_all", flops.six_n_all), ("tflops_hardware", flops.hardware))}
    util = {u: (tflops[t] / peak if peak else None) for u, t in (
        ("mfu", "tflops_true"), ("mfu_6n_all", "tflops_6n_all"), ("hfu", "tflops_hardware"))}
    return {"tokens_per_s": rate * flops.seq_len, "samples_per_s": rate,
            "images_per_s": rate * flops.num_media, **tflops, **util}


def device_peak(device: torch.device, override: float | None) -> tuple[str, float | None, str]:
    """(device name, dense bf16 peak TFLOP/s or None, where the peak comes from)."""
    if device.type != "cuda":
        return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads", None, "none (CPU)"
    name = torch.cuda.get_device_name(device)
    if override:
        return name, override, "--peak-tflops"
    for key, peak, source in PEAK_BF16_TFLOPS:
        if key in name:
            return name, peak, source
    return name, None, "unknown device: pass --peak-tflops"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda if torch.cuda.is_available() else None}
    for dist in ("deepspeed", "transformers", "open_clip_torch", "open-flamingo", "triton", "flash-attn"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    try:
        out["megaflamingo_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["megaflamingo_commit"] = None
    return out


ROWS = (  # (label, key, format)
    ("step time, median (s)", "step_s", "{:.4f}"), ("  forward (s)", "forward_s", "{:.4f}"),
    ("  backward (s)", "backward_s", "{:.4f}"), ("  optimizer (s)", "optimizer_s", "{:.4f}"),
    ("tokens/s/device", "tokens_per_s", "{:.1f}"), ("samples/s/device", "samples_per_s", "{:.3f}"),
    ("images/s/device", "images_per_s", "{:.3f}"), ("true TFLOP/s", "tflops_true", "{:.4g}"),
    ("true MFU", "mfu", "{:.1%}"), ("6N-all TFLOP/s", "tflops_6n_all", "{:.4g}"),
    ("6N-all MFU", "mfu_6n_all", "{:.1%}"), ("HFU TFLOP/s (with recompute)", "tflops_hardware", "{:.4g}"),
    ("HFU", "hfu", "{:.1%}"), ("peak memory (GiB)", "peak_memory_gib", "{:.2f}"),
    ("loss first -> last", None, None),
)


def format_report(report: dict) -> str:
    runs = report["runs"]
    names = list(runs)
    width = max(14, *(len(n) for n in names))
    lines = [
        f"megaflamingo benchmarks/tflops.py  {report['date']}",
        f"config {report['config']}  overrides {' '.join(report['overrides']) or '-'}",
        *[f"  note: {n}" for n in report["notes"]],
        f"device {report['device']}  peak bf16 {report['peak_tflops'] or '-'} TFLOP/s ({report['peak_source']})",
        f"versions {' '.join(f'{k}={v}' for k, v in report['versions'].items() if v)}",
        f"shapes: stream {report['stream']}, micro-batch B={report['micro_batch']} x {report['accum']} per step, "
        f"T={report['seq_len']}, M={report['num_media']} images; {report['steps']} timed steps after "
        f"{report['warmup']} warmup; world size {report['world_size']}",
        f"FLOPs/sample (TF): true {report['flops']['true'] / 1e12:.4g}, 6N-all "
        f"{report['flops']['six_n_all'] / 1e12:.4g}, trainable-6N {report['flops']['six_n_trainable'] / 1e12:.4g}, "
        f"with recompute {report['flops']['hardware'] / 1e12:.4g} (causal attention halved)",
        *[f"  {n}: {r['trainer']}" + (f"  FAILED: {r['error']}" if "error" in r else "") for n, r in runs.items()],
        "",
        f"{'metric':<30}" + "".join(f"{n:>{width + 2}}" for n in names),
    ]
    for label, key, fmt in ROWS:
        cells = []
        for r in runs.values():
            if key is None:
                cells.append(f"{r['loss_first']:.3g}->{r['loss_last']:.3g}" if "loss_first" in r else "-")
            else:
                cells.append("-" if r.get(key) is None else fmt.format(r[key]))
        lines.append(f"{label:<30}" + "".join(f"{c:>{width + 2}}" for c in cells))
    if report.get("speedup_vs_baseline"):
        lines.append(f"megaflamingo / open_flamingo samples/s: {report['speedup_vs_baseline']:.2f}x")
    lines.append(f"memory: {report['memory_kind']}; data: one synthetic micro-batch kept on the device")
    return "\n".join(lines)
