"""Convert megaflamingo models: to Hugging Face, to and from OpenFlamingo's released checkpoints.

    python launcher/convert.py to-hf --config C.yaml [key=value ...] [--checkpoint RUN_OR_STEP_DIR] \\
        --out DIR [--dtype fp32|bf16] [--lm-and-adapter]
    python launcher/convert.py to-openflamingo --config C.yaml [key=value ...] [--checkpoint DIR] --out checkpoint.pt
    python launcher/convert.py from-openflamingo --checkpoint checkpoint.pt --lm LM_DIR --vision ViT-L-14|V.yaml \\
        --tokenizer TOK_DIR --out DIR [--dtype fp32|bf16] [--lm-and-adapter]
    python launcher/convert.py reshard RUN_DIR --tp N [--pp M] [--zero-stage Z] --out DIR

`--checkpoint` takes a run directory (its newest complete checkpoint), its checkpoints/ folder or
one step directory, of any layout (TP / PP / ZeRO shards are consolidated). Outputs are written
to a temporary sibling and renamed into place when complete; a failed conversion leaves the
previous output untouched. Errors: one line, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout too


def add_to_hf(sub) -> None:
    p = sub.add_parser("to-hf", help="a self-contained Hugging Face directory (trust_remote_code)")
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint", default=None, help="training run / checkpoint directory")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--lm-and-adapter", action="store_true", help="plain HF LM dir + adapter.safetensors")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    p.set_defaults(run="to_hf")


def add_to_openflamingo(sub) -> None:
    p = sub.add_parser("to-openflamingo", help="the trainable state as a released-format checkpoint.pt")
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--out", required=True, help="checkpoint.pt to write")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(run="to_openflamingo")


def add_from_openflamingo(sub) -> None:
    p = sub.add_parser("from-openflamingo", help="a released checkpoint.pt -> Hugging Face directory")
    p.add_argument("--checkpoint", required=True, help="OpenFlamingo checkpoint.pt")
    p.add_argument("--lm", required=True, help="the LM's Hugging Face directory")
    p.add_argument("--vision", required=True, help="open_clip model name, or a YAML/JSON model.vision section")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--lm-and-adapter", action="store_true")
    p.set_defaults(run="from_openflamingo")


def add_reshard(sub) -> None:
    p = sub.add_parser("reshard", help="a run directory's newest checkpoint for another parallel layout")
    p.add_argument("run_dir", help="training output directory (config.yaml, checkpoints/)")
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--zero-stage", type=int, default=None, help="default: the run's")
    p.add_argument("--out", required=True, help="the new run directory (must not exist)")
    p.set_defaults(run="reshard", runners="megaflamingo.training.reshard")


SUBCOMMANDS = (add_to_hf, add_to_openflamingo, add_from_openflamingo, add_reshard)
"""One function per subcommand: it declares the arguments and names its runner in
megaflamingo.convert.commands (or in the module its `runners` default names)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    args, rest = parser.parse_known_args(argv)
    if any(r.startswith("-") or "=" not in r for r in rest) or (rest and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if rest:  # key=value overrides split by options (argparse takes one positional run only)
        args.overrides = [*args.overrides, *rest]
    import importlib

    commands = importlib.import_module(getattr(args, "runners", "megaflamingo.convert.commands"))

    try:
        return getattr(commands, args.run)(args)
    except (ValueError, OSError, KeyError) as err:  # ConfigError, CheckpointError, ... are ValueErrors
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
