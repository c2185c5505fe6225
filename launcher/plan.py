"""Plan a run's memory per rank and stage before renting the cluster (no weights allocated or read).

    python launcher/plan.py --config configs/llama3-70b-3d.yaml --hostfile hostfiles/h100-8nodes --gpu-mem 80GiB
    python launcher/plan.py --config configs/openflamingo-9b.yaml --world 64 parallel.zero_stage=2

Only the LM's config.json is read (`model.lm.hf_path` may hold nothing else); absent vision
weights, tokenizer and shards are noted and skipped. Prints parameters (frozen / trainable), weight,
gradient, optimizer and activation memory per stage and per rank, the micro-batch layout, the
pipeline bubble and the model FLOPs per step. Exit 2 with one line when the layout is illegal or a
rank does not fit `--gpu-mem`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout too

_UNITS = {"": 1, "B": 1, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 1e3, "MB": 1e6,
          "GB": 1e9, "TB": 1e12}


def parse_bytes(text: str) -> float:
    """'80GiB' -> 85899345920.0; raises ValueError on anything else."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if match is None or match.group(2).upper() not in _UNITS:
        raise ValueError(f"--gpu-mem: expected a size such as 80GiB, got '{text}'")
    return float(match.group(1)) * _UNITS[match.group(2).upper()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML run config")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--hostfile", help="DeepSpeed hostfile ('<host> slots=<n>' per line)")
    where.add_argument("--world", type=int, help="number of ranks")
    parser.add_argument("--gpu-mem", help="device memory per rank, e.g. 80GiB (no fit check without)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    from megaflamingo.config import ConfigError
    from megaflamingo.planning import run_plan, world_from_hostfile

    try:
        gpu_mem = None if args.gpu_mem is None else parse_bytes(args.gpu_mem)
        world, hosts = world_from_hostfile(args.hostfile) if args.hostfile else (args.world, None)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run_plan(args.config, world, args.overrides, hosts, gpu_mem)

if __name__ == "__main__":
    sys.exit(main())
