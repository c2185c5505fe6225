"""One training step of megaflamingo against open_flamingo's: time and peak RSS, same weights, same batch.

    python benchmarks/step.py                      # CPU, the OpenFlamingo-shaped model below
    python benchmarks/step.py --repeats 9 --json benchmarks/results/step_cpu.json
    python benchmarks/step.py --loss plain         # megaflamingo with the full-logits loss
    python benchmarks/step.py --step engine        # megaflamingo through build_engine + training.step
    python benchmarks/step.py --matmul-floor       # also each side's matmul GFLOP / ms and this core's sgemm rate

Shapes: B batch, T text tokens, M images per sample, V vocabulary rows.

The model (OpenFlamingo-shaped, random weights): a LLaMA-like LM (d = 512, 8 layers, 8 heads,
MLP 1376, V = 32,000 with `<|endofchunk|>`, `<image>`, `<PAD>` as the last three ids, untied head),
cross-attention every 2 layers (OpenFlamingo's 8 x 64 heads, ff x4), a small ViT (96 px, patch 16,
width 384, 6 layers) and OpenFlamingo's Perceiver (6 layers, 64 latents). One MMC4-shaped
micro-batch: B = 2, T = 256, M = 5 images per sample at irregular positions, `<image>` labels
masked; both samples have the same number of targets, so OpenFlamingo's token mean over the batch
and megaflamingo's per-sample mean are the same loss.

Timing: open_flamingo's model is built by its own factory (`openflamingo_baseline.py`) and trained
its way (AdamW on its trainable set: Perceiver, cross-attention, the whole input embedding with
the gradient rows of the two new tokens kept); megaflamingo's model gets the very same weights
(`copy_reference_weights`) and trains with its own step: forward to the final hidden states, the
fused linear + cross-entropy loss (`training.loss.head_loss`; `--loss plain`: full logits and
`flamingo_loss`), backward, gradient clipping, and the trainer's optimizer from
`training.engine.build_optimizer` (fused AdamW, weight decay on the cross-attention blocks as in
OpenFlamingo's recipe) (`--step plain`, the default: that step written out in this file; `--step engine`: the DeepSpeed engine of
`training.engine.build_engine` and the step function of `training.step`, what the trainer runs,
with `model.kernels.fused_loss` set from --loss). Both run in this process,
taking turns in every repeat (a loaded machine slows both alike); the first losses (identical
weights) are printed side by side and must agree. Reported: median step seconds and the ratio.

Memory: each side trains alone in a fresh child process (same imports in both) for the warmup and
two steps; reported: that process's peak RSS (VmHWM) after the imports, after building, at the
end, and the ratio of the end values. A run's peak varies by ~20 MiB with where the allocator
happens to place things, so each side runs `--memory-rounds` times (default 3, taking turns) and
the median is compared.
"""

from __future__ import annotations

import argparse
import json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from megaflamingo.config import Config, config_from_dict  # noqa: E402

B, T, M = 2, 256, 5
MODEL = {
    "vision": {"open_clip_config": {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 96, "patch_size": 16, "width": 384, "layers": 6, "head_width": 64,
                       "mlp_ratio": 4.0},
        "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}},
    "lm": {"family": "llama", "vocab_size": 32000, "hidden_size": 512, "num_layers": 8, "num_heads": 8,
           "intermediate_size": 1376, "tie_word_embeddings": False},
    "cross_attn_every_n_layers": 2, "vocab_size": 32000,
    "eoc_token_id": 31997, "media_token_id": 31998, "pad_token_id": 31999,
}
# <image> positions per sample (irregular; the first at t = 0 as in MMC4 documents)
IMAGE_POSITIONS = ([0, 31, 44, 150, 201], [0, 90, 101, 112, 240])


def bench_config() -> Config:
    """The benchmark's config (model above, default optimizer: AdamW lr 1e-4, wd 0.1, clip 1.0)."""
    return config_from_dict({"model": MODEL, "train": {"precision": "fp32"}})


def mmc4_batch(cfg: Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """One micro-batch: random text ids, `<image>` at IMAGE_POSITIONS, `<|endofchunk|>` before each
    later image, labels = ids with `<image>` masked (-100); every sample has T - 1 - (M - 1) targets."""
    m = cfg.model
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, m.eoc_token_id, (B, T), generator=gen)
    for b, starts in enumerate(IMAGE_POSITIONS):
        ids[b, starts] = m.media_token_id
        ids[b, [s - 1 for s in starts[1:]]] = m.eoc_token_id
    labels = ids.masked_fill(ids == m.media_token_id, -100)
    side = m.vision.open_clip_config["vision_cfg"]["image_size"]
    images = torch.randn(B, M, 1, 3, side, side, generator=gen)
    return dict(images=images, input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                loss_weight=torch.ones(B))


class MegaflamingoTrainer:
    """megaflamingo's training step on one process: forward, loss, backward, clipping, AdamW.

    Args:
        cfg: the benchmark config.
        model: a built Flamingo.
        loss: "fused" (`head_loss`, chunked linear + cross entropy) or "plain" (logits + flamingo_loss).
    """

    def __init__(self, cfg: Config, model: torch.nn.Module, loss: str = "fused") -> None:
        self.model, self.loss_kind = model.train(), loss
        from megaflamingo.training.engine import build_optimizer

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = build_optimizer(cfg, model, zero_stage=0)  # the trainer's optimizer, built its way
        self.grad_clip = cfg.optim.grad_clip
        self.name = f"megaflamingo ({loss} loss), {type(self.opt).__name__} (fused), fp32"

    def forward(self, batch: dict) -> torch.Tensor:
        from megaflamingo.training.loss import flamingo_loss, head_loss

        h = self.model.hidden_states(batch["images"], batch["input_ids"], batch["attention_mask"])
        if self.loss_kind == "fused":
            return head_loss(self.model.lm.head(), h, batch["labels"], batch["loss_weight"])
        return flamingo_loss(self.model.lm.logits(h), batch["labels"], batch["loss_weight"])

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, last: bool = True) -> None:
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class EngineStepTrainer:
    """megaflamingo's real step: `build_engine` + `build_train_step` (one rank, ZeRO-0, fp32)."""

    def __init__(self, cfg: Config, model: torch.nn.Module) -> None:
        from tflops import EngineTrainer

        self.inner = EngineTrainer(cfg, model, micro_batch=B, accum=1)
        self.name = self.inner.name

    def train_step(self, batch: dict) -> float:
        return float(self.inner.step_fn([batch]).loss)


def build_trainers(cfg: Config, workdir: Path, loss: str, identical: bool = True, step: str = "plain"):
    """(open_flamingo trainer, megaflamingo trainer), megaflamingo holding open_flamingo's weights."""
    from megaflamingo.builder import build_model
    from openflamingo_baseline import OpenFlamingoTrainer, copy_reference_weights

    torch.manual_seed(0)
    ref = OpenFlamingoTrainer(cfg, torch.device("cpu"), workdir)
    ref.model.vision_encoder.final_ln_after_pool = True  # released models' pre-ln_post tokens, as ours
    ours = build_model(cfg.model)
    if identical:
        copy_reference_weights(ours, ref.model)
    if step == "engine":
        cfg.model.kernels.fused_loss = loss == "fused"
        return ref, EngineStepTrainer(cfg, ours)
    return ref, MegaflamingoTrainer(cfg, ours, loss)


def train_step(trainer, batch: dict) -> float:
    if isinstance(trainer, EngineStepTrainer):
        return trainer.train_step(batch)
    loss = trainer.forward(batch)
    trainer.backward(loss)
    trainer.step(last=True)
    return float(loss.detach())


def time_interleaved(trainers: dict, batch: dict, warmup: int, repeats: int) -> dict:
    """Median seconds per training step of each trainer, taking turns; first and last losses."""
    first = {name: train_step(t, batch) for name, t in trainers.items()}  # identical weights here
    for _ in range(warmup):
        for t in trainers.values():
            train_step(t, batch)
    times: dict[str, list[float]] = {name: [] for name in trainers}
    last = {}
    for _ in range(repeats):
        for name, t in trainers.items():
            start = time.perf_counter()
            last[name] = train_step(t, batch)
            times[name].append(time.perf_counter() - start)
    return {name: {"step_s": statistics.median(times[name]), "step_s_all": times[name],
                   "loss_first": first[name], "loss_last": last[name]} for name in trainers}


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def _matmul_flops(name: str, shapes: list) -> int:
    """Multiply-add FLOPs (2 m n k) of one profiled matmul from its input shapes."""
    a, b = (shapes[1], shapes[2]) if name in ("aten::addmm", "aten::baddbmm") else (shapes[0], shapes[1])
    batch = a[0] if len(a) == 3 else 1
    return 2 * batch * a[-2] * a[-1] * b[-1]


def matmul_work(trainer, batch: dict, steps: int = 2) -> dict:
    """What one training step spends in matrix multiplies: GFLOP and milliseconds (torch.profiler,
    self CPU time of aten::mm / addmm / bmm / baddbmm, averaged over `steps` steps)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            train_step(trainer, batch)
    flops = seconds = 0.0
    for event in prof.events():
        if event.name in MATMUL_OPS:
            flops += _matmul_flops(event.name, [list(s) for s in event.input_shapes])
            seconds += event.self_cpu_time_total / 1e6
    return {"gflop": flops / steps / 1e9, "ms": seconds / steps * 1e3}


def sgemm_peak_gflops(n: int = 2048, repeats: int = 9) -> float:
    """This core's fp32 matmul rate on one large square product: the fastest of `repeats` (the same
    product varies by up to ~25% between runs on a shared machine; the fastest bounds the floor)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / min(times) / 1e9


def matmul_floor(trainers: dict, batch: dict, timing: dict) -> dict:
    """Each side's matmul work and the rest of its step, and what the step-time goal leaves.

    The rest is the median (unprofiled) step minus the profiled matmul time. The floor is
    megaflamingo's matmul FLOPs at the large-square sgemm rate measured here: no arrangement of the
    same fp32 products on this core is expected to beat it.
    """
    peak = sgemm_peak_gflops()
    out: dict = {"sgemm_peak_gflops": peak}
    for name, trainer in trainers.items():
        work = matmul_work(trainer, batch)
        work["gflops_rate"] = work["gflop"] / work["ms"] * 1e3
        work["rest_ms"] = timing[name]["step_s"] * 1e3 - work["ms"]
        out[name] = work
    mf, of_step = out["megaflamingo"], timing["open_flamingo"]["step_s"] * 1e3
    out["floor_ms"] = mf["gflop"] / peak * 1e3
    out["floor_ratio"] = out["floor_ms"] / of_step
    out["goal_leaves_for_rest_ms"] = 0.8 * of_step - mf["ms"]
    return out


def _rss_mib() -> float:
    """This process's peak RSS in MiB: VmHWM (ru_maxrss would carry the forking parent's peak
    across exec on Linux)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(side: str, loss: str, warmup: int, step: str = "plain") -> dict:
    """In this (fresh) process: build one side alone, train warmup + 2 steps; peak RSS in MiB."""
    import open_flamingo  # noqa: F401  (both sides import the same packages before the baseline)
    import open_clip  # noqa: F401
    import transformers  # noqa: F401

    import megaflamingo.builder  # noqa: F401
    import megaflamingo.training.engine  # noqa: F401  (DeepSpeed: imported by both sides alike)
    from openflamingo_baseline import OpenFlamingoTrainer

    cfg, batch = bench_config(), mmc4_batch(bench_config())
    before = _rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        if side == "open_flamingo":
            trainer = OpenFlamingoTrainer(cfg, torch.device("cpu"), Path(tmp))
        elif step == "engine":
            from megaflamingo.builder import build_model

            cfg.model.kernels.fused_loss = loss == "fused"
            trainer = EngineStepTrainer(cfg, build_model(cfg.model))
        else:
            from megaflamingo.builder import build_model

            trainer = MegaflamingoTrainer(cfg, build_model(cfg.model), loss)
        built = _rss_mib()
        for _ in range(warmup + 2):
            train_step(trainer, batch)
    return {"side": side, "peak_rss_mib": _rss_mib(), "peak_rss_after_imports_mib": before,
            "peak_rss_after_build_mib": built}


def measure_memory(loss: str, warmup: int, step: str = "plain", rounds: int = 3) -> dict:
    """Peak RSS of each side in its own child process (`--memory-child`), `rounds` children per side
    taking turns; per side the round with the median peak (a run's peak varies by ~20 MiB with the
    allocator's layout), and every round's peak."""
    runs: dict[str, list[dict]] = {"open_flamingo": [], "megaflamingo": []}
    for _ in range(rounds):
        for side in runs:
            cmd = [sys.executable, __file__, "--memory-child", side, "--loss", loss, "--warmup", str(warmup),
                   "--step", step]
            # a fresh world of one: not the parent's RANK / MASTER_PORT (its process group holds that port)
            env = {k: v for k, v in os.environ.items()
                   if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            runs[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    out = {}
    for side, results in runs.items():
        ordered = sorted(results, key=lambda r: r["peak_rss_mib"])
        out[side] = dict(ordered[(len(ordered) - 1) // 2], peak_rss_mib_all=[r["peak_rss_mib"] for r in results])
    return out


def environment() -> dict:
    """Device, versions, threads and date for the record."""
    import open_clip
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import importlib.metadata as md

    return {"device": f"cpu: {cpu}", "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "open_clip": open_clip.__version__, "open_flamingo": md.version("open_flamingo"),
            "python": platform.python_version(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per side (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--loss", choices=("fused", "plain"), default="fused")
    parser.add_argument("--step", choices=("plain", "engine"), default="plain",
                        help="megaflamingo's step: written out here, or build_engine + training.step")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes")
    parser.add_argument("--memory-rounds", type=int, default=3, help="peak-RSS children per side (median)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--matmul-floor", action="store_true",
                        help="also profile each side's matmul work (GFLOP, ms) against this core's sgemm rate")
    parser.add_argument("--memory-child", choices=("open_flamingo", "megaflamingo"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.loss, args.warmup, args.step)))
        return 0

    cfg = bench_config()
    batch = mmc4_batch(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        ref, ours = build_trainers(cfg, Path(tmp), args.loss, step=args.step)
        timing = time_interleaved({"open_flamingo": ref, "megaflamingo": ours}, batch, args.warmup, args.repeats)
        floor = matmul_floor({"open_flamingo": ref, "megaflamingo": ours}, batch, timing) if args.matmul_floor else None
    del ref, ours
    env = environment()
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    print(f"B={B} T={T} M={M} V={cfg.model.vocab_size} loss={args.loss} step={args.step} warmup={args.warmup} "
          f"repeats={args.repeats}")
    of, mf = timing["open_flamingo"], timing["megaflamingo"]
    print(f"first-step loss (identical weights): open_flamingo {of['loss_first']:.6f}  "
          f"megaflamingo {mf['loss_first']:.6f}  |diff| {abs(of['loss_first'] - mf['loss_first']):.2e}")
    pairs = [m / o for o, m in zip(of["step_s_all"], mf["step_s_all"])]  # same repeat: same machine load
    print(f"median step: open_flamingo {of['step_s'] * 1e3:.0f} ms  megaflamingo {mf['step_s'] * 1e3:.0f} ms  "
          f"ratio {mf['step_s'] / of['step_s']:.3f} (goal <= 0.8)")
    print(f"fastest step: open_flamingo {min(of['step_s_all']) * 1e3:.0f} ms  megaflamingo "
          f"{min(mf['step_s_all']) * 1e3:.0f} ms  ratio {min(mf['step_s_all']) / min(of['step_s_all']):.3f}; "
          f"median of per-repeat ratios {statistics.median(pairs):.3f}")
    result = {"environment": env, "config": {"B": B, "T": T, "M": M, "model": MODEL, "loss": args.loss,
                                             "step": args.step, "warmup": args.warmup, "repeats": args.repeats,
                                             "image_positions": IMAGE_POSITIONS},
              "timing": timing, "step_time_ratio": mf["step_s"] / of["step_s"],
              "step_time_ratio_fastest": min(mf["step_s_all"]) / min(of["step_s_all"]),
              "step_time_ratio_median_of_pairs": statistics.median(pairs)}
    if floor is not None:
        for side in ("open_flamingo", "megaflamingo"):
            w = floor[side]
            print(f"matmuls per step, {side}: {w['gflop']:.1f} GFLOP in {w['ms']:.0f} ms ({w['gflops_rate']:.1f} "
                  f"GFLOP/s); the rest of its median step: {w['rest_ms']:.0f} ms")
        print(f"fp32 sgemm here (2048^3): {floor['sgemm_peak_gflops']:.1f} GFLOP/s; megaflamingo's matmuls at that "
              f"rate alone: {floor['floor_ms']:.0f} ms = {floor['floor_ratio']:.3f}x open_flamingo's median step; "
              f"the 0.8x goal leaves {floor['goal_leaves_for_rest_ms']:.0f} ms for the rest "
              f"(measured: {floor['megaflamingo']['rest_ms']:.0f})")
        result["matmul_floor"] = floor
    if not args.no_memory:
        mem = measure_memory(args.loss, args.warmup, args.step, args.memory_rounds)
        ratio = mem["megaflamingo"]["peak_rss_mib"] / mem["open_flamingo"]["peak_rss_mib"]
        print(f"peak RSS (median of {args.memory_rounds}): "
              f"open_flamingo {mem['open_flamingo']['peak_rss_mib']:.0f} MiB  "
              f"megaflamingo {mem['megaflamingo']['peak_rss_mib']:.0f} MiB  ratio {ratio:.3f} (goal <= 0.8); all: "
              + "  ".join(f"{side} " + "/".join(f"{v:.0f}" for v in mem[side]["peak_rss_mib_all"]) for side in mem))
        result.update(memory=mem, peak_rss_ratio=ratio)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
