"""KV-cached vs uncached decoding on a config's model (the demo's by default): same tokens, time.

    python benchmarks/eval_decoding.py --config configs/demo-cpu.yaml --data runs/demo/data/vqa/test.jsonl \
        [--questions 32] [--batch-size 8] [--json OUT.json] [key=value ...]

Runs the suite's easy-vqa batches (greedy, 5 new tokens: the demo's evaluation) and the same
prompts with OpenFlamingo's caption settings (3 beams, 20 new tokens), each with
`UncachedDecoder` and `CachedDecoder`, checks that both give the same predictions, and prints the
seconds and the speedup (trainable weights random: decoding cost does not depend on them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo-cpu.yaml")
    p.add_argument("--data", required=True, help="easy-vqa jsonl")
    p.add_argument("--questions", type=int, default=32, help="questions for the greedy run")
    p.add_argument("--beam-questions", type=int, default=8, help="questions for the beam run (slow uncached)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    import torch

    from megaflamingo.config import load_config
    from megaflamingo.eval.cache import CachedDecoder
    from megaflamingo.eval.generation import UncachedDecoder
    from megaflamingo.eval.suite import build_evaluator
    from megaflamingo.eval.tasks import TASKS, read_easyvqa

    cfg = load_config(args.config, args.overrides)
    ev = build_evaluator(cfg, None, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    items = read_easyvqa(Path(args.data))
    settings = {"greedy, 5 tokens": (TASKS["easyvqa"], items[:args.questions]),
                "3 beams, 20 tokens": (dataclasses.replace(TASKS["easyvqa"], num_beams=3, max_new_tokens=20),
                                       items[:args.beam_questions])}
    result = {"config": args.config, "batch_size": args.batch_size,
              "device": str(ev.device), "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d"), "runs": {}}
    for name, (task, items) in settings.items():
        times, preds = {}, {}
        for label, make in (("uncached", UncachedDecoder), ("cached", CachedDecoder)):
            ev.make_decoder = make
            start, out = time.perf_counter(), []
            for i in range(0, len(items), args.batch_size):
                batch = items[i:i + args.batch_size]
                out += ev.run_batch(task, batch, [[] for _ in batch], shots=0)
            times[label], preds[label] = time.perf_counter() - start, out
        same = preds["cached"] == preds["uncached"]
        result["runs"][name] = {"questions": len(items), **{f"{k}_s": round(v, 2) for k, v in times.items()},
                                "speedup": round(times["uncached"] / times["cached"], 2), "same_predictions": same}
        print(f"{name}: uncached {times['uncached']:.1f} s, cached {times['cached']:.1f} s, "
              f"speedup {times['uncached'] / times['cached']:.2f}x, same predictions: {same}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if all(r["same_predictions"] for r in result["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
