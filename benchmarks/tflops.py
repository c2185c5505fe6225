"""Training throughput, true TFLOP/s and MFU of a Flamingo config at its real shapes (random weights).

    python benchmarks/tflops.py --config configs/openflamingo-9b.yaml --steps 20 --warmup 3 \\
        --micro-batch 4 --baseline openflamingo --json benchmarks/results/of9b-h100.json [key=value ...]

Shapes: B micro-batch, T text tokens, M images per sample (the stream's seq_len and max_num_media,
MMC4 by default), S image side.

What runs:
- The config is loaded with every missing local path replaced: the vision tower comes from its
  open_clip config without weights, a released LM path (`lm/mpt-7b`, ...) becomes the inline sizes
  of `KNOWN_LMS` (from each model's public config.json), the tokenizer becomes its known length.
  `key=value` overrides apply on top (`parallel.zero_stage=1`, `model.lm.num_layers=4`, ...).
- One synthetic micro-batch (B, M images, `<image>` tokens spread evenly with the first at t = 0,
  so every token attends to an image) stays on the device: data loading is not timed.
- `--warmup` then `--steps` training steps (forward, loss, backward, optimizer step) through the
  DeepSpeed engine of `megaflamingo.training.engine.build_engine`, or, where that module is not
  there yet, a plain single-process torch step (AdamW on the trainable parameters, bf16 autocast
  on CUDA); the output names which one ran. Each phase is timed between device syncs; throughput
  uses the median step.
- `--baseline openflamingo`: the `open_flamingo` package's model at the same shapes, built by its
  own `create_model_and_transforms` with random weights and trained the way OpenFlamingo's loop
  does (`benchmarks/openflamingo_baseline.py`), in the same process, before ours.

FLOPs come from `megaflamingo.models.flops.count_flops` (causal self-attention halved, Megatron
convention): true TFLOP/s and MFU on the frozen-aware count, the "6N over all parameters"
convention, and HFU (with activation recompute when parallel.activation_checkpointing). The
baseline does the same useful work, so its numbers use the same count. MFU needs a known peak
(`PEAK_BF16_TFLOPS`, or --peak-tflops); CPU runs print TFLOP/s only.

Several ranks: `deepspeed --num_gpus 8 benchmarks/tflops.py --config C parallel.tp=2 ...` (rank 0
prints). Rates are per device: each replica of tp * pp devices trains B * --accum samples per step.
Pipeline stages need --accum >= pp micro-batches to fill the pipeline.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from megaflamingo.config import Config, ConfigError, config_from_dict
from megaflamingo.config import _apply_override as apply_override  # the loader's own key=value rule
from megaflamingo.models.flops import StepFlops, count_flops, vision_shape

# Dense bf16 TFLOP/s (no sparsity), matched by substring of torch.cuda.get_device_name(), first hit
# wins. Source: reference/perf_anchors.md §1.1 (stas00/ml-engineering compute/accelerator/README.md
# and NVIDIA's A100 / H100 / H200 datasheets).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0, "NVIDIA H100 PCIe datasheet (1513 with sparsity / 2)"),
    ("H100", 989.0, "NVIDIA H100 SXM datasheet (1979 with sparsity / 2)"),
    ("H200", 989.0, "NVIDIA H200 datasheet (same compute as H100 SXM)"),
    ("A100", 312.0, "NVIDIA A100 datasheet (624 with sparsity / 2)"),
)

# Released LM checkpoints the configs point at, by directory name: sizes from each model's public
# config.json; tokenizer_len is len() of its tokenizer (EleutherAI gpt-neox-20b: 50,277), before
# OpenFlamingo adds <|endofchunk|>, <image> and <PAD> (reference/openflamingo.md §0.6).
KNOWN_LMS = {
    "mpt-7b": dict(family="mpt", vocab_size=50432, hidden_size=4096, num_layers=32, num_heads=32,
                   intermediate_size=16384, tie_word_embeddings=True, tokenizer_len=50277),
    "mpt-1b-redpajama-200b": dict(family="mpt", vocab_size=50432, hidden_size=2048, num_layers=24,
                                  num_heads=16, intermediate_size=8192, tie_word_embeddings=True,
                                  tokenizer_len=50277),
    "RedPajama-INCITE-Base-3B-v1": dict(
        family="gpt_neox", vocab_size=50432, hidden_size=2560, num_layers=32, num_heads=32,
        intermediate_size=10240, rotary_pct=1.0, use_parallel_residual=False, hidden_act="gelu",
        attention_bias=True, mlp_bias=True, tie_word_embeddings=False, tokenizer_len=50277),
    "Meta-Llama-3-70B": dict(family="llama", vocab_size=128256, hidden_size=8192, num_layers=80, num_heads=64,
                             num_kv_heads=8, intermediate_size=28672, rope_theta=500000.0,
                             max_position_embeddings=8192, tie_word_embeddings=False, tokenizer_len=128256),
}


# ----------------------------------------------------------------------------- config


def _missing(path: str | None) -> bool:
    return path is not None and not Path(path).exists()


def _replace_lm(model: dict, notes: list[str], pinned: set[str]) -> None:
    """An absent released LM directory -> its inline sizes and the token ids its tokenizer gives.

    As with a real hf_path, the checkpoint's sizes win over inline ones, except the `pinned` keys
    (given as command-line overrides).
    """
    lm = model.get("lm") or {}
    if not _missing(lm.get("hf_path")):
        return
    name = Path(lm["hf_path"]).name
    if name not in KNOWN_LMS:
        raise ConfigError(f"model.lm.hf_path {lm['hf_path']} does not exist and '{name}' is not in "
                          f"KNOWN_LMS ({', '.join(KNOWN_LMS)}): give inline sizes (model.lm.family=... "
                          f"model.lm.hf_path=null)")
    sizes = dict(KNOWN_LMS[name])
    n = sizes.pop("tokenizer_len")
    model["lm"] = {**sizes, **{k: v for k, v in lm.items() if k in pinned - {"hf_path"}}}
    if _missing(model.get("tokenizer")) or model.get("tokenizer") is None:
        # OpenFlamingo's order: <|endofchunk|>, <image>, then <PAD>.
        for key, value in (("vocab_size", n + 3), ("eoc_token_id", n), ("media_token_id", n + 1),
                           ("pad_token_id", n + 2)):
            model.setdefault(key, value)
    notes.append(f"LM {name}: inline sizes from KNOWN_LMS, random weights, vocab {n + 3}")


def benchmark_config(path: str, overrides: list[str]) -> tuple[Config, list[str]]:
    """Load a run config for benchmarking: absent local paths become random weights / known sizes.

    Returns:
        The validated config and human-readable notes on what was substituted.
    Raises:
        ConfigError: an unreadable config, an unknown absent LM, or a bad override.
    """
    if not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    raw, notes = yaml.safe_load(Path(path).read_text()) or {}, []
    for item in overrides:  # before the substitutions, so an overridden path is substituted too
        apply_override(raw, item)
    model = raw.setdefault("model", {})
    vision = model.setdefault("vision", {})
    if _missing(vision.get("weights")):
        notes.append(f"vision {vision.get('open_clip_model', 'inline')}: random weights")
        vision.pop("weights")
    _replace_lm(model, notes, {o.split("=", 1)[0].removeprefix("model.lm.") for o in overrides
                               if o.startswith("model.lm.")})
    for key in ("tokenizer", "openflamingo_checkpoint"):
        if _missing(model.get(key)):
            model.pop(key)
    for stream in (raw.get("data") or {}).values():
        if isinstance(stream, dict):
            stream.pop("shards", None)
    cfg = config_from_dict(raw)
    if cfg.model.vocab_size is None and cfg.model.tokenizer is None:
        cfg.model.vocab_size = cfg.model.lm.vocab_size
    return cfg, notes


# ----------------------------------------------------------------------------- inputs


def synthetic_batch(cfg: Config, B: int, T: int, M: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One fixed micro-batch: M images, `<image>` at t = k * T // M (each chunk closed by EOC)."""
    m = cfg.model
    S = vision_shape(m).image_size
    gen = torch.Generator().manual_seed(0)
    top = min(i for i in (m.media_token_id, m.eoc_token_id, m.pad_token_id) if i is not None)
    ids = torch.randint(0, top, (B, T), generator=gen)
    starts = [k * T // M for k in range(M)]
    ids[:, starts] = m.media_token_id
    ids[:, [s - 1 for s in starts[1:]]] = m.eoc_token_id
    labels = ids.masked_fill(ids == m.media_token_id, -100)
    images = torch.randn(B, M, 1, 3, S, S, generator=gen)
    batch = dict(images=images, input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                 loss_weight=torch.ones(B))
    return {k: v.to(device) for k, v in batch.items()}


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of logits[:, t] against labels[:, t + 1]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


# ----------------------------------------------------------------------------- trainers


class PlainTrainer:
    """One process: AdamW on the trainable parameters; frozen weights bf16 + autocast on CUDA bf16.

    The stand-in for the DeepSpeed engine where `megaflamingo.training.engine` cannot be imported.
    """

    pipeline = False

    def __init__(self, cfg: Config, model: torch.nn.Module, device: torch.device) -> None:
        self.model, self.device = model.to(device).train(), device
        self.amp = device.type == "cuda" and cfg.train.precision == "bf16"
        self.params = [p for p in model.parameters() if p.requires_grad]
        for p in self.params:
            p.data = p.data.float()  # fp32 masters, whatever dtype the build used
        o = cfg.optim
        self.opt = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                     weight_decay=o.weight_decay, fused=device.type == "cuda")
        self.grad_clip = o.grad_clip
        self.name = ("plain torch step, AdamW, single process (training.engine not importable)"
                     + (", bf16 autocast" if self.amp else ", fp32"))

    def forward(self, batch: dict) -> torch.Tensor:
        images = batch["images"].to(next(self.model.vision.parameters()).dtype)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.model(images, batch["input_ids"], batch["attention_mask"])
            return next_token_loss(logits, batch["labels"])

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, last: bool) -> None:
        if not last:
            return  # accumulate
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class EngineTrainer:
    """The real DeepSpeed engine (`training.engine.build_engine`) on this process's layout."""

    def __init__(self, cfg: Config, model: torch.nn.Module, micro_batch: int, accum: int) -> None:
        from megaflamingo.training import engine as engine_lib

        groups = init_distributed(cfg)
        dims = groups.dims
        self.engine = engine_lib.build_engine(cfg, model, groups, batch_size=micro_batch * accum * dims.dp,
                                              micro_batch_size=micro_batch)
        self.pipeline = engine_lib.is_pipeline(self.engine)
        self.pipeline_item = engine_lib.pipeline_item
        self.name = (f"DeepSpeed {'PipelineEngine' if self.pipeline else 'engine'} via training.engine."
                     f"build_engine: tp={dims.tp} pp={dims.pp} dp={dims.dp} zero={cfg.parallel.zero_stage} "
                     f"{cfg.train.precision}, {accum} micro-batch(es)/step")

    def forward(self, batch: dict) -> torch.Tensor:
        return self.engine(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self, last: bool) -> None:
        self.engine.step()  # the engine steps the optimizer at its accumulation boundary

    def train_batch(self, batches: list[dict]) -> torch.Tensor:
        return self.engine.train_batch(iter([self.pipeline_item(b) for b in batches]))


def init_distributed(cfg: Config):
    """torch.distributed through DeepSpeed (a one-rank world unless a launcher set one up), and groups."""
    import socket

    import deepspeed
    import torch.distributed as dist

    from megaflamingo.parallel.topology import build_groups, check_layout
    from megaflamingo.training.engine import skip_shm_op_build

    if "RANK" not in os.environ:  # plain `python benchmarks/tflops.py`: a world of one
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    skip_shm_op_build()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return build_groups(check_layout(cfg, dist.get_world_size()))


def engine_available() -> bool:
    """True when `megaflamingo.training.engine` (and what it imports) can be imported."""
    try:
        import megaflamingo.training.engine  # noqa: F401
    except ImportError:
        return False
    return True


def _dtype_for_build(cfg: Config, device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" and cfg.train.precision == "bf16" else torch.float32


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_ours(cfg: Config, device: torch.device, micro_batch: int, accum: int, use_engine: bool):
    """Our model, built directly on the device (bf16 weights when training in bf16), and its trainer."""
    from megaflamingo.models.flamingo import build_model

    with torch.device(device), _default_dtype(_dtype_for_build(cfg, device)):
        model = build_model(cfg.model)
    if use_engine:
        return EngineTrainer(cfg, model, micro_batch, accum)
    return PlainTrainer(cfg, model, device)


# ----------------------------------------------------------------------------- timing and numbers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "CUDA max allocated during the timed run"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process max RSS so far (CPU)"


def _timed_step(trainer, batch: dict, accum: int, device: torch.device) -> tuple[torch.Tensor, dict]:
    """One optimizer step of `accum` micro-batches; seconds per phase, each phase between syncs."""
    if trainer.pipeline:  # the pipeline schedule interleaves the phases: whole step only
        t0 = time.perf_counter()
        loss = trainer.train_batch([batch] * accum)
        _sync(device)
        return loss, {"step_s": time.perf_counter() - t0}
    spent = {"forward_s": 0.0, "backward_s": 0.0, "optimizer_s": 0.0}
    for i in range(accum):
        t0 = time.perf_counter()
        loss = trainer.forward(batch)
        _sync(device)
        t1 = time.perf_counter()
        trainer.backward(loss)
        _sync(device)
        t2 = time.perf_counter()
        trainer.step(last=i == accum - 1)
        _sync(device)
        t3 = time.perf_counter()
        for key, dt in zip(spent, (t1 - t0, t2 - t1, t3 - t2)):
            spent[key] += dt
    return loss, {**spent, "step_s": sum(spent.values())}


def time_steps(trainer, batch: dict, steps: int, warmup: int, accum: int, device: torch.device) -> dict:
    """Run warmup + timed optimizer steps; the median seconds of each phase and the losses seen."""
    phases: dict[str, list[float]] = {}
    losses = []
    for i in range(warmup + steps):
        if i == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        loss, spent = _timed_step(trainer, batch, accum, device)
        losses.append(float(loss.detach()))
        if i >= warmup:
            for key, value in spent.items():
                phases.setdefault(key, []).append(value)
    out = {key: statistics.median(values) for key, values in phases.items()}
    out["step_mean_s"] = statistics.fmean(phases["step_s"])
    out["loss_first"], out["loss_last"] = losses[0], losses[-1]
    out["losses_finite"] = all(math.isfinite(x) for x in losses)
    return out


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


# ----------------------------------------------------------------------------- report


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


# ----------------------------------------------------------------------------- main


def run_one(name: str, make_trainer, batch: dict, args, flops: StepFlops, samples_per_device: float,
            peak: float | None, device: torch.device) -> dict:
    trainer = make_trainer()
    timing = time_steps(trainer, batch, args.steps, args.warmup, args.accum, device)
    result = {"trainer": trainer.name, **timing, **throughput(timing, flops, samples_per_device, peak),
              "peak_memory_gib": _peak_memory_gib(device)[0]}
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"[tflops] {name}: median step {timing['step_s']:.4f} s", file=sys.stderr, flush=True)
    return result


def run_baseline(cfg: Config, args, batch: dict, flops: StepFlops, peak: float | None,
                 device: torch.device) -> dict:
    """`run_one` for open_flamingo; a failure (out of memory, say) is recorded, not fatal: ours still runs."""
    baseline = _sibling("openflamingo_baseline")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return run_one("open_flamingo", lambda: baseline.OpenFlamingoTrainer(cfg, device, Path(tmp)),
                           batch, args, flops, args.micro_batch * args.accum, peak, device)
    except (RuntimeError, ImportError) as err:  # torch.OutOfMemoryError is a RuntimeError
        error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    gc.collect()  # outside the except block: the traceback no longer pins the baseline's tensors
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"[tflops] open_flamingo failed: {error}", file=sys.stderr, flush=True)
    return {"trainer": "open_flamingo 2.0.1", "error": error}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=None, help="B (default: the stream's micro_batch_size, else 1)")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--stream", choices=("mmc4", "laion"), default="mmc4", help="whose seq_len / max_num_media")
    parser.add_argument("--json", default=None, help="also write the report here")
    parser.add_argument("--baseline", choices=("openflamingo",), default=None)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, for unknown GPUs")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.accum < 1:
        parser.error("--steps and --accum must be >= 1, --warmup >= 0")
    return args


def _sibling(name: str):
    """Import benchmarks/<name>.py, however this script was loaded."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _device() -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def measure(cfg: Config, args, notes: list[str]) -> dict:
    """Time the baseline (if asked) and ours; the report as plain data."""
    stream = getattr(cfg.data, args.stream)
    B = args.micro_batch = args.micro_batch or stream.micro_batch_size or 1
    T, M = stream.seq_len, stream.max_num_media
    device, world = _device(), int(os.environ.get("WORLD_SIZE", 1))
    torch.manual_seed(cfg.train.seed)
    flops = count_flops(cfg.model, T, M, recompute=cfg.parallel.activation_checkpointing)
    device_name, peak, peak_source = device_peak(device, args.peak_tflops)
    batch = synthetic_batch(cfg, B, T, M, device)
    use_engine = engine_available()
    if not use_engine:
        notes.append("megaflamingo.training.engine is not importable: timed a plain torch step instead")
    runs = {}
    if args.baseline and world > 1:
        notes.append("--baseline skipped: it runs single-process only")
    elif args.baseline:  # first: a plain torch model frees cleanly before ours is built
        runs["open_flamingo"] = run_baseline(cfg, args, batch, flops, peak, device)
    per_device = B * args.accum / (cfg.parallel.tp * cfg.parallel.pp)
    ours = run_one("megaflamingo", lambda: build_ours(cfg, device, B, args.accum, use_engine),
                   batch, args, flops, per_device, peak, device)
    runs = {"megaflamingo": ours, **runs}
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": args.config,
        "overrides": args.overrides, "notes": notes, "device": device_name, "peak_tflops": peak,
        "peak_source": peak_source, "versions": versions(), "stream": args.stream, "micro_batch": B,
        "accum": args.accum, "seq_len": T, "num_media": M, "steps": args.steps, "warmup": args.warmup,
        "world_size": world, "flops": flops.as_dict(), "runs": runs,
        "memory_kind": _peak_memory_gib(device)[1],
        "speedup_vs_baseline": (ours["samples_per_s"] / runs["open_flamingo"]["samples_per_s"]
                                if "samples_per_s" in runs.get("open_flamingo", {}) else None),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg, notes = benchmark_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = measure(cfg, args, notes)
    import torch.distributed as dist

    if dist.is_initialized():  # every rank, or gloo may abort at exit
        dist.barrier()
        dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        print(format_report(report))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
