"""Offline resharding: a run directory's newest checkpoint, set up for another parallel layout.

    python launcher/convert.py reshard RUN_DIR --tp N --pp M [--zero-stage Z] --out DIR

Every checkpoint carries its trainable weights and Adam moments in a layout-free form
(`layout_free/`, see training/layout_free.py) beside DeepSpeed's layout-bound files, and its data
position as one entry per canonical reader. Resharding therefore needs no process group: OUT gets
the run's config with the new `parallel.tp/pp/zero_stage` (and `train.output_dir` = OUT), the
layout-free state, the run state (counters, RNG, every rank's data position merged) and the
metrics so far. Launching `launcher/pretrain.py --config OUT/config.yaml` on a world of
tp x pp x dp ranks, for any dp the data order allows, continues the run from that step: the
trainer loads the layout-free state into its new engine. The same happens without this command
when a run directory is resumed on another layout; `reshard` checks the new layout first, and
makes a directory that no longer needs the old layout's files.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch
import yaml

from megaflamingo.config import Config, ConfigError, load_config, to_dict
from megaflamingo.data.dealing import merge_states
from megaflamingo.data.loader import check_data_parallel
from megaflamingo.resolve import check_layout
from megaflamingo.training.checkpoint import final_name, latest_checkpoint
from megaflamingo.training.layout_free import DIR, LayoutError, read_layout_free


def _new_config(run_dir: Path, out: Path, tp: int, pp: int, zero_stage: int | None) -> Config:
    """The run's config with the new layout; ConfigError when the model cannot take it."""
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: no config.yaml (not a training run directory)")
    cfg = load_config(run_dir / "config.yaml")
    zero = cfg.parallel.zero_stage if zero_stage is None else zero_stage
    cfg = dataclasses.replace(
        cfg, parallel=dataclasses.replace(cfg.parallel, tp=tp, pp=pp, zero_stage=zero),
        train=dataclasses.replace(cfg.train, output_dir=str(out)))
    check_layout(cfg, tp * pp)  # dp = 1 always fits; the model's own limits are checked here
    return cfg


def legal_dp(cfg: Config, largest: int = 64) -> list[int]:
    """The data-parallel sizes up to `largest` whose data order is the run's (dealing.py)."""
    legal = []
    for dp in range(1, largest + 1):
        try:
            check_data_parallel(cfg, dp)
        except ConfigError:
            continue
        legal.append(dp)
    return legal


def _run_state(step_dir: Path) -> dict:
    """Counters, RNG and the merged data position of a checkpoint, as one rank-free extra."""
    extras = [torch.load(f, weights_only=False) for f in sorted(step_dir.glob("extra_rank*.pt"))]
    if not extras:
        raise LayoutError(f"{step_dir}: no extra_rank*.pt (not a complete training checkpoint)")
    first = extras[0]
    return {**first, "loader": merge_states([e["loader"] for e in extras]), "layout": None}


def reshard_run(run_dir: str | Path, tp: int, pp: int, out: str | Path,
                zero_stage: int | None = None) -> Path:
    """Write OUT: the newest checkpoint of RUN_DIR, ready to resume on tp x pp (x any legal dp).

    Args:
        run_dir: a training output directory (config.yaml, checkpoints/).
        tp, pp: the new tensor- and pipeline-parallel sizes.
        out: the new run directory (must not exist; written to a temporary sibling, then renamed).
        zero_stage: the new ZeRO stage (None: keep).
    Returns:
        The new checkpoint directory.
    Raises:
        ConfigError: the model cannot be split that way (one line: which rule).
        LayoutError: the checkpoint has no layout-free state.
        FileExistsError: OUT exists.
    """
    run_dir, out = Path(run_dir), Path(out)
    if out.exists():
        raise FileExistsError(f"--out {out} exists; choose a new directory")
    cfg = _new_config(run_dir, out, tp, pp, zero_stage)
    step_dir = latest_checkpoint(run_dir / "checkpoints")
    if step_dir is None:
        raise LayoutError(f"{run_dir}: no complete checkpoint under checkpoints/")
    read_layout_free(step_dir)  # present and readable, else a one-line LayoutError
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    target = tmp / "checkpoints" / final_name(int(step_dir.name.split("_")[1]))
    target.mkdir(parents=True)
    shutil.copytree(step_dir / DIR, target / DIR)
    torch.save(_run_state(step_dir), target / "extra_rank0.pt")
    (tmp / "checkpoints" / "latest").write_text(target.name)
    (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if (run_dir / "metrics.jsonl").is_file():
        shutil.copy(run_dir / "metrics.jsonl", tmp / "metrics.jsonl")
    os.replace(tmp, out)
    return out / "checkpoints" / target.name


def reshard(args) -> int:
    """`launcher/convert.py reshard` (argparse namespace: run_dir, tp, pp, zero_stage, out)."""
    step_dir = reshard_run(args.run_dir, args.tp, args.pp, args.out, args.zero_stage)
    cfg = load_config(Path(args.out) / "config.yaml")
    dps = ", ".join(str(d) for d in legal_dp(cfg))
    print(f"resharded {step_dir.name} for tp={args.tp} pp={args.pp} "
          f"zero_stage={cfg.parallel.zero_stage}: launch {args.tp * args.pp} x dp ranks "
          f"(dp in {dps}) with --config {Path(args.out) / 'config.yaml'}")
    return 0
