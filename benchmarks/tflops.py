"""Training throughput, true TFLOP/s and MFU of a Flamingo at its real shapes (random weights), timing
the step function that trains (`megaflamingo.training.step`), beside open_flamingo's own step.

    python benchmarks/tflops.py            # a default sized to the device, with the open_flamingo baseline
    python benchmarks/tflops.py --config configs/openflamingo-9b.yaml --steps 20 --warmup 3 \\
        --micro-batch 4 --baseline openflamingo --json benchmarks/results/of9b-h100.json [key=value ...]

Shapes: B micro-batch, T text tokens, M images per sample (the stream's seq_len and max_num_media,
MMC4 by default), S image side.

What runs:
- The config (`tflops_inputs.py`): --config with every missing local path replaced by random
  weights / known sizes and `key=value` overrides on top; without --config a default sized to the
  device (OpenFlamingo-3B or -9B shapes on a GPU, a small LLaMA-like Flamingo on a CPU) with the
  baseline beside it. The report's notes say what was chosen.
- One synthetic micro-batch (B, M images, `<image>` tokens spread evenly with the first at t = 0,
  so every token attends to an image) stays on the device: data loading is not timed.
- `--warmup` then `--steps` optimizer steps of `training.step.TrainStep` on the DeepSpeed engine
  of `training.engine.build_engine` (forward, loss, backward, optimizer step; the NaN/Inf guard
  included), each phase timed between device syncs; throughput uses the median step.
- `--baseline openflamingo`: the `open_flamingo` package's model at the same shapes, built by its
  own `create_model_and_transforms` with random weights and trained the way OpenFlamingo's loop
  does (`benchmarks/openflamingo_baseline.py`), in the same process, before ours.

Rates and utilisation: `tflops_report.py`. Several ranks: `deepspeed --num_gpus 8
benchmarks/tflops.py --config C parallel.tp=2 ...` (rank 0 prints). Rates are per device: each
replica of tp * pp devices trains B * --accum samples per step. Pipeline stages need --accum >= pp
micro-batches to fill the pipeline.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from megaflamingo.config import Config, ConfigError
from megaflamingo.models.flops import StepFlops, count_flops


def _sibling(name: str) -> ModuleType:
    """Import benchmarks/<name>.py, however this script was loaded."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


inputs, report_lib = _sibling("tflops_inputs"), _sibling("tflops_report")
benchmark_config, default_config, synthetic_batch = (inputs.benchmark_config, inputs.default_config,
                                                     inputs.synthetic_batch)


# ----------------------------------------------------------------------------- ours


def init_distributed(cfg: Config) -> Any:
    """torch.distributed through DeepSpeed (a one-rank world unless a launcher set one up), and groups."""
    import socket

    import torch.distributed as dist

    from megaflamingo.parallel.topology import build_groups
    from megaflamingo.resolve import check_layout
    from megaflamingo.training.engine import init_distributed_backend

    if "RANK" not in os.environ:  # plain `python benchmarks/tflops.py`: a world of one
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    init_distributed_backend()
    return build_groups(check_layout(cfg, dist.get_world_size()))


class EngineTrainer:
    """The real DeepSpeed engine (`training.engine.build_engine`) and the step function that trains
    (`training.step`, via `build_train_step`) on this process's layout."""

    def __init__(self, cfg: Config, model: torch.nn.Module, micro_batch: int, accum: int) -> None:
        from megaflamingo.training import engine as engine_lib

        groups = init_distributed(cfg)
        dims = groups.dims
        self.engine = engine_lib.build_engine(cfg, model, groups, batch_size=micro_batch * accum * dims.dp,
                                              micro_batch_size=micro_batch)
        self.step_fn = engine_lib.build_train_step(self.engine, groups)
        self.pipeline = self.step_fn.pipeline
        self.name = (f"DeepSpeed {'PipelineEngine' if self.pipeline else 'engine'} via training.engine."
                     f"build_engine + training.step: tp={dims.tp} pp={dims.pp} dp={dims.dp} "
                     f"zero={cfg.parallel.zero_stage} {cfg.train.precision}, {accum} micro-batch(es)/step")

    def timed_step(self, batches: list[dict], device: torch.device) -> tuple[float, dict]:
        """One step of the training step function; (loss, seconds per phase and in all)."""
        from megaflamingo.training.step import PhaseTimer

        self.step_fn.timer = timer = PhaseTimer(device)
        loss = self.step_fn(batches).loss
        self.step_fn.timer = None
        return loss, {**{f"{k}_s": v for k, v in timer.seconds.items()}, "step_s": sum(timer.seconds.values())}


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


def build_ours(cfg: Config, device: torch.device, micro_batch: int, accum: int) -> EngineTrainer:
    """Our model, built directly on the device (bf16 weights when training in bf16), in its engine."""
    from megaflamingo.builder import build_model

    with torch.device(device), _default_dtype(_dtype_for_build(cfg, device)):
        model = build_model(cfg.model, resolved=True)
    return EngineTrainer(cfg, model, micro_batch, accum)


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "CUDA max allocated during the timed run"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process max RSS so far (CPU)"


def _timed_step(trainer: Any, batch: dict, accum: int, device: torch.device) -> tuple[float, dict]:
    """One optimizer step of `accum` micro-batches; seconds per phase, each phase between syncs."""
    if isinstance(trainer, EngineTrainer):
        return trainer.timed_step([batch] * accum, device)
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
    return float(loss.detach()), {**spent, "step_s": sum(spent.values())}


def time_steps(trainer: Any, batch: dict, steps: int, warmup: int, accum: int, device: torch.device) -> dict:
    """Run warmup + timed optimizer steps; the median seconds of each phase and the losses seen."""
    phases: dict[str, list[float]] = {}
    losses = []
    for i in range(warmup + steps):
        if i == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        loss, spent = _timed_step(trainer, batch, accum, device)
        losses.append(float(loss))
        if i >= warmup:
            for key, value in spent.items():
                phases.setdefault(key, []).append(value)
    out = {key: statistics.median(values) for key, values in phases.items()}
    out["step_mean_s"] = statistics.fmean(phases["step_s"])
    out["loss_first"], out["loss_last"] = losses[0], losses[-1]
    out["losses_finite"] = all(math.isfinite(x) for x in losses)
    return out


# ----------------------------------------------------------------------------- main


def run_one(name: str, make_trainer: Callable[[], Any], batch: dict, args: argparse.Namespace, flops: StepFlops,
            samples_per_device: float, peak: float | None, device: torch.device) -> dict:
    """Build a trainer, time its steps; its row of the report."""
    trainer = make_trainer()
    timing = time_steps(trainer, batch, args.steps, args.warmup, args.accum, device)
    result = {"trainer": trainer.name, **timing, **report_lib.throughput(timing, flops, samples_per_device, peak),
              "peak_memory_gib": _peak_memory_gib(device)[0]}
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"[tflops] {name}: median step {timing['step_s']:.4f} s", file=sys.stderr, flush=True)
    return result


def run_baseline(cfg: Config, args: argparse.Namespace, batch: dict, flops: StepFlops, peak: float | None,
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
    parser.add_argument("--config", default=None, help="YAML run config (default: one sized to the device)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 3 for the CPU default)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; 1 for the CPU default)")
    parser.add_argument("--micro-batch", type=int, default=None, help="B (default: the stream's micro_batch_size, else 1)")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--stream", choices=("mmc4", "laion"), default="mmc4", help="whose seq_len / max_num_media")
    parser.add_argument("--json", default=None, help="also write the report here")
    parser.add_argument("--baseline", choices=("openflamingo", "none"), default=None,
                        help="default: openflamingo without --config, none with it")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, for unknown GPUs")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = parser.parse_args(argv)
    small = args.config is None and not torch.cuda.is_available()
    args.steps = args.steps if args.steps is not None else (3 if small else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if small else 2)
    args.baseline = args.baseline or ("openflamingo" if args.config is None else "none")
    if args.steps < 1 or args.warmup < 0 or args.accum < 1:
        parser.error("--steps and --accum must be >= 1, --warmup >= 0")
    return args


def _device() -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def measure(cfg: Config, args: argparse.Namespace, notes: list[str]) -> dict:
    """Time the baseline (if asked) and ours; the report as plain data."""
    stream = getattr(cfg.data, args.stream)
    B = args.micro_batch = args.micro_batch or stream.micro_batch_size or 1
    T, M = stream.seq_len, stream.max_num_media
    device, world = _device(), int(os.environ.get("WORLD_SIZE", 1))
    torch.manual_seed(cfg.train.seed)
    flops = count_flops(cfg.model, T, M, recompute=cfg.parallel.activation_checkpointing)
    device_name, peak, peak_source = report_lib.device_peak(device, args.peak_tflops)
    batch = synthetic_batch(cfg, B, T, M, device)
    runs = {}
    if args.baseline == "openflamingo" and world > 1:
        notes.append("--baseline skipped: it runs single-process only")
    elif args.baseline == "openflamingo":  # first: a plain torch model frees cleanly before ours is built
        runs["open_flamingo"] = run_baseline(cfg, args, batch, flops, peak, device)
    per_device = B * args.accum / (cfg.parallel.tp * cfg.parallel.pp)
    ours = run_one("megaflamingo", lambda: build_ours(cfg, device, B, args.accum),
                   batch, args, flops, per_device, peak, device)
    runs = {"megaflamingo": ours, **runs}
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": args.config,
        "overrides": args.overrides, "notes": notes, "device": device_name, "peak_tflops": peak,
        "peak_source": peak_source, "versions": report_lib.versions(), "stream": args.stream, "micro_batch": B,
        "accum": args.accum, "seq_len": T, "num_media": M, "steps": args.steps, "warmup": args.warmup,
        "world_size": world, "flops": flops.as_dict(), "runs": runs,
        "memory_kind": _peak_memory_gib(device)[1],
        "speedup_vs_baseline": (ours["samples_per_s"] / runs["open_flamingo"]["samples_per_s"]
                                if "samples_per_s" in runs.get("open_flamingo", {}) else None),
    }


def load(args: argparse.Namespace) -> tuple[Config, list[str]]:
    """The config to benchmark: --config's, or the device-sized default (`args.config` names it)."""
    if args.config is not None:
        return benchmark_config(args.config, args.overrides)
    cfg, notes, args.config = default_config(_device(), args.overrides)
    print(f"[tflops] {notes[0]}", file=sys.stderr, flush=True)
    return cfg, notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg, notes = load(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = measure(cfg, args, notes)
    import torch.distributed as dist

    if dist.is_initialized():  # every rank, or gloo may abort at exit
        dist.barrier()
        dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        print(report_lib.format_report(report))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
