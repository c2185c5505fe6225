"""The plan as text: layout, micro-batches, bubble, FLOPs, a table per stage and a line per rank."""

from __future__ import annotations

from megaflamingo.planning.plan import GiB, Plan, RankPlan

_TERMS = (("frozen_weights", "frozenW"), ("trainable_weights", "trainW"), ("gradients", "grads"),
          ("optimizer", "optim"), ("zero3_gather", "z3gather"), ("activations", "activ"))


def _gib(value: float) -> str:
    return f"{value / GiB:9.2f}"


def _params(value: int) -> str:
    return f"{value / 1e9:8.3f}B" if value >= 1e8 else f"{value / 1e6:8.2f}M"


def _header(plan: Plan) -> list[str]:
    d = plan.dims
    lines = [f"layout: world {d.world_size} = tp {d.tp} x pp {d.pp} x dp {d.dp} (axis order pp, dp, tp); "
             f"{plan.settings}"]
    lines += [f"note: {n}" for n in plan.notes]
    for s in plan.streams:
        mb = s.micro_batch
        lines.append(f"stream {s.name}: {s.batch_size} samples/step = dp {d.dp} x {s.accumulation} micro-batches "
                     f"x {mb.batch} (T={mb.seq_len}, M={mb.num_media}); {s.flops_per_sample:.4g} FLOPs/sample")
    lines.append(f"micro-batches per step per rank: {plan.micro_batches}; pipeline bubble "
                 f"{d.pp - 1}/{plan.micro_batches + d.pp - 1} = {100 * plan.bubble:.1f}%")
    lines.append(f"model FLOPs per step: {plan.flops_per_step:.4g} (frozen-aware, models/flops.py; "
                 f"hardware incl. recompute {sum(s.batch_size * s.hardware_flops_per_sample for s in plan.streams):.4g})")
    return lines


def _row(label: str, r: RankPlan, gpu_mem: float | None) -> str:
    fits = "" if gpu_mem is None else ("  fits" if r.peak <= gpu_mem else "  DOES NOT FIT")
    terms = "".join(_gib(r.memory[k]) for k, _ in _TERMS)
    return (f"{label} {_params(r.params.frozen)} {_params(r.params.trainable)}{terms}{_gib(r.peak)}{fits}")


def format_plan(plan: Plan) -> str:
    """The report `launcher/plan.py` prints (memory in GiB, parameters in elements held)."""
    lines = _header(plan)
    head = "".join(f"{t:>9}" for _, t in _TERMS)
    lines.append(f"per stage (worst tp rank; GiB; pipeline layers: 0 = vision + perceiver + embedding, "
                 f"1..L = decoder layers, L+1 = head):")
    lines.append(f"stage layers       {'frozen':>9} {'trainable':>9}{head}{'peak':>9}")
    for stage in range(plan.dims.pp):
        worst = max((r for r in plan.ranks if r.coords["pp"] == stage), key=lambda r: r.peak)
        span = f"[{plan.parts[stage]}, {plan.parts[stage + 1]})"
        lines.append(_row(f"{stage:5d} {span:12s}", worst, plan.gpu_mem))
    lines.append("per rank:")
    lines.append(f"rank host           pp dp tp {'frozen':>9} {'trainable':>9}{head}{'peak':>9}")
    for r in plan.ranks:
        c = r.coords
        lines.append(_row(f"{r.rank:4d} {r.host[:14]:14s} {c['pp']:2d} {c['dp']:2d} {c['tp']:2d}", r, plan.gpu_mem))
    if plan.gpu_mem is not None:
        worst = max(plan.ranks, key=lambda r: r.peak)
        verdict = "fits" if worst.peak <= plan.gpu_mem else "does NOT fit"
        lines.append(f"device memory {plan.gpu_mem / GiB:.1f} GiB: {verdict} (worst rank {worst.rank}: "
                     f"{worst.peak / GiB:.2f} GiB of tensors; CUDA context, NCCL buffers and "
                     f"fragmentation come on top)")
    return "\n".join(lines)


def run_plan(config: str, world_size: int, overrides: list[str] = (), hosts: list[str] | None = None,
             gpu_mem: float | None = None, quiet: bool = False) -> int:
    """Plan, print (unless `quiet`) and check a run: the body of `launcher/plan.py` and of
    `launcher/pretrain.py --dry-run`.

    Returns:
        0, or 2 after one `error:` line on stderr (illegal layout, bad config, does not fit).
    """
    import sys

    from megaflamingo.config import ConfigError
    from megaflamingo.planning.inputs import load_plan_config
    from megaflamingo.planning.plan import build_plan, check_fits

    try:
        cfg, notes = load_plan_config(config, list(overrides))
        plan = build_plan(cfg, world_size, hosts, gpu_mem, notes)
        if not quiet:
            print(format_plan(plan))
        check_fits(plan)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
