"""Evaluate a trained megaflamingo model (zero-shot VQA on a VQA-format jsonl).

    python launcher/evaluate.py vqa --config configs/demo-cpu.yaml --data runs/demo/data/vqa/test.jsonl \
        [--checkpoint auto|DIR] [--limit 300] [--baseline] [--json out.json]

`--checkpoint auto` takes the newest checkpoint under train.output_dir. `--baseline` also scores
the same model with every image blanked (a text-only baseline through the same script).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout too


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=["vqa"])
    parser.add_argument("--config", required=True)
    parser.add_argument("--data", required=True, help="VQA-format jsonl")
    parser.add_argument("--checkpoint", default="auto")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--baseline", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    from megaflamingo.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from megaflamingo.data.images import build_image_transform
    from megaflamingo.data.tokenizer import load_tokenizer
    from megaflamingo.eval.vqa import evaluate_vqa, read_vqa_jsonl
    from megaflamingo.models.flamingo import build_model
    from megaflamingo.training.checkpoint import latest_checkpoint, load_trainable_weights

    tokenizer, ids = load_tokenizer(cfg.model.tokenizer)
    model = build_model(cfg.model).eval()
    ckpt = latest_checkpoint(Path(cfg.train.output_dir) / "checkpoints") if args.checkpoint == "auto" \
        else Path(args.checkpoint)
    if ckpt is None:
        print(f"error: no checkpoint under {cfg.train.output_dir}", file=sys.stderr)
        return 2
    load_trainable_weights(model, ckpt)
    items, transform = read_vqa_jsonl(args.data, args.limit), build_image_transform(cfg)
    result = {"checkpoint": str(ckpt), "trained": evaluate_vqa(model, tokenizer, transform, items, ids.eoc_token_id)}
    if args.baseline:
        result["blank_images"] = evaluate_vqa(model, tokenizer, transform, items, ids.eoc_token_id,
                                              blank_images=True)
    for name in ("trained", "blank_images"):
        if name in result:
            print(f"{name}: VQA accuracy {result[name]['accuracy']:.1f}% on {result[name]['count']} questions")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
