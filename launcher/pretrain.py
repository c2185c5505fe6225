"""Train a Flamingo model with megaflamingo (one process per rank).

    deepspeed --hostfile hostfiles/a100 launcher/pretrain.py --config configs/openflamingo-9b.yaml
    deepspeed --num_gpus 2 launcher/pretrain.py --config configs/tiny.yaml train.steps=20
    python launcher/pretrain.py --config configs/tiny.yaml            # a single process
    WORLD_SIZE=64 python launcher/pretrain.py --config C --dry-run    # memory plan only (launcher/plan.py)

Overrides are dotted `key=value` pairs (`optim.lr=3e-4 parallel.tp=2`). The run resumes from the
newest checkpoint in train.output_dir unless `--resume none`; `--resume DIR` picks one. A config
error or an illegal parallel layout exits with code 2 and one line, before any rank starts work;
too many NaN/Inf steps in a row exit with code 1 and one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout too


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("--resume", default=None, help="checkpoint dir, 'auto' or 'none'")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("--dry-run", action="store_true", help="print the per-rank memory plan and exit")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    if args.dry_run:  # no weights, no process group: launcher/plan.py on this launch's world size
        import os

        from megaflamingo.planning import run_plan

        return run_plan(args.config, int(os.environ.get("WORLD_SIZE", "1")), args.overrides,
                        quiet=os.environ.get("RANK", "0") != "0")
    from megaflamingo.config import ConfigError, load_config
    from megaflamingo.data.shards import ShardNotFoundError

    try:
        cfg = load_config(args.config, args.overrides)
        resume = args.resume or cfg.checkpoint.resume or "auto"
        from megaflamingo.builder import build_training_model
        from megaflamingo.training.loop import TrainingAborted, run

        try:  # each rank builds only its own share of the model (stage layers, TP slices)
            return run(cfg, build_training_model, resume=None if resume == "none" else resume)
        except TrainingAborted as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    except (ConfigError, ShardNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
