"""Evaluate a megaflamingo model: OpenFlamingo's few-shot suite, or the demo's easy-vqa check.

    python launcher/evaluate.py --config C --checkpoint auto|none|DIR --data SPEC.yaml \
        --tasks coco,vqav2,hatefulmemes --shots 0,4,8 [--rices] [--num-samples N] [--trials K] [--out DIR] \
        [--vqa-metric openflamingo|official|official_2017] [--batch-size 8] [--no-kv-cache] [key=value ...]
    torchrun --nproc_per_node 2 launcher/evaluate.py ...        # or: deepspeed --num_gpus 2 ...
    python launcher/evaluate.py vqa --config configs/demo-cpu.yaml --data runs/demo/data/vqa/test.jsonl \
        [--checkpoint auto|DIR] [--limit 300] [--baseline] [--json out.json]

Data-parallel ranks split the batches (results identical to one rank); rank 0 writes
OUT/results.json and OUT/results.md (beside OpenFlamingo's published numbers). The `vqa` form is
the suite's easy-vqa task at 0 shots (greedy), `--limit` scored questions drawn with seed 42, and
`--baseline` adds the same model with every image blanked. Data spec format: megaflamingo/eval/suite.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout too


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    legacy = bool(argv) and argv[0] == "vqa"
    if legacy:
        p.add_argument("task", choices=["vqa"])
        p.add_argument("--limit", type=int, default=-1)
        p.add_argument("--baseline", action="store_true")
        p.add_argument("--json", default=None)
    else:
        p.add_argument("--tasks", required=True)
        p.add_argument("--shots", default="0,4,8,16,32")
        p.add_argument("--rices", action="store_true")
        p.add_argument("--rices-cache", default=None, help="folder for cached RICES features (default OUT/rices)")
        p.add_argument("--num-samples", type=int, default=-1)
        p.add_argument("--trials", type=int, default=1)
        p.add_argument("--trial-seeds", default=None, help="comma-separated, one per trial (default 42, 43, ...)")
        p.add_argument("--query-set-size", type=int, default=2048)
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--vqa-metric", default="openflamingo", choices=["openflamingo", "official", "official_2017"])
        p.add_argument("--out", default="runs/eval")
    p.add_argument("--config", required=True)
    p.add_argument("--data", required=True, help="data spec (suite) or VQA jsonl (vqa)")
    p.add_argument("--checkpoint", default="auto")
    p.add_argument("--no-kv-cache", action="store_true", help="decode without the KV cache (the reference)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    from megaflamingo.config import ConfigError, load_config
    from megaflamingo.eval.suite import run_cli

    try:
        cfg = load_config(args.config, args.overrides)
        return run_cli(cfg, args)
    except (ConfigError, ValueError, FileNotFoundError, LookupError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
