"""A real run to Hugging Face: `deepspeed launcher/pretrain.py` on 2 CPU ranks (ZeRO-1, the tiny
config), then `convert.py to-hf --checkpoint RUN` (in-process); the exported model gives the logits of the
model the run's checkpoint describes (built as training builds it, trainable weights loaded by
training's own `load_trainable_weights`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.assets import make_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_pretrain_run_exports_to_hf_with_the_trained_logits(tmp_path):
    from megaflamingo.builder import build_model
    from megaflamingo.config import load_config
    from megaflamingo.data.easyvqa import write_easy_vqa
    from megaflamingo.training.checkpoint import latest_checkpoint, load_trainable_weights
    from transformers import AutoModelForImageTextToText

    tok = make_bpe_tokenizer(tmp_path / "tok", vocab_size=257)
    write_easy_vqa(tmp_path / "data", limit=60, shard_size=30)
    overrides = [f"model.tokenizer={tok}", f"data.laion.shards={tmp_path}/data/laion/*.tar",
                 f"data.mmc4.shards={tmp_path}/data/mmc4/*.tar", "data.mmc4_options.min_image_bytes=0",
                 "data.laion.batch_size=4", "data.mmc4.batch_size=2", "data.mmc4.seq_len=64", "train.steps=2",
                 "checkpoint.every=2", "parallel.zero_stage=1", "optim.lr=3e-2", f"train.output_dir={tmp_path}/run"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(29500 + (os.getpid() + 37) % 1000), "launcher/pretrain.py", "--config", "configs/tiny.yaml", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    from tests.convert.test_convert_cli import _launcher  # launcher/convert.py's main, in this process

    assert _launcher()(["to-hf", "--config", str(ROOT / "configs/tiny.yaml"), *overrides,
                        "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0

    cfg = load_config(ROOT / "configs/tiny.yaml", overrides)
    torch.manual_seed(cfg.train.seed)  # as training/loop.py builds
    model = build_model(cfg.model).eval()
    load_trainable_weights(model, latest_checkpoint(tmp_path / "run" / "checkpoints"))
    exported = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 250, (2, 10), generator=gen)
    ids[:, 2] = model.media_token_id
    vision_x = torch.randn(2, 1, 1, 3, 32, 32, generator=gen)
    with torch.no_grad():
        want = model(vision_x, ids)
        got = exported(input_ids=ids, vision_x=vision_x).logits
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
    gate = model.xattn[next(iter(model.xattn))].attn_gate.detach().item()
    assert gate != 0.0  # the run trained: the checkpoint is not the initial state
