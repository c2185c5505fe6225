"""A step whose loss is NaN is skipped on every rank and counted; parameters do not move."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megaflamingo.training.metrics import read_metrics
from tests.assets import make_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

# Runs the real launcher entry point with a loader whose second step carries NaN images.
SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import megaflamingo.data.loader as loader_module

class NaNOnSecondStep:
    def __init__(self, inner):
        self.inner = inner
    def __getattr__(self, name):
        return getattr(self.inner, name)
    def __iter__(self):
        for i, micro_batches in enumerate(self.inner):
            if i == 1:
                micro_batches[0]["images"] = torch.full_like(micro_batches[0]["images"], float("nan"))
            yield micro_batches

build = loader_module.build_train_loader
loader_module.build_train_loader = lambda *a, **k: NaNOnSecondStep(build(*a, **k))
sys.argv = ["pretrain.py", *sys.argv[2:]]
import runpy
runpy.run_path("launcher/pretrain.py", run_name="__main__")
"""


@pytest.mark.parametrize("zero", [0, 1])
def test_nan_step_is_skipped_and_counted(tmp_path, zero):
    from megaflamingo.data.easyvqa import write_easy_vqa

    tok = make_bpe_tokenizer(tmp_path / "tok", vocab_size=257)
    write_easy_vqa(tmp_path / "data", limit=40, shard_size=20)
    out = tmp_path / "run"
    args = ["--config", "configs/tiny.yaml", f"model.tokenizer={tok}",
            f"data.laion.shards={tmp_path}/data/laion/*.tar", f"data.mmc4.shards={tmp_path}/data/mmc4/*.tar",
            "data.mmc4_options.min_image_bytes=0", "data.laion.batch_size=2", "data.mmc4.batch_size=2",
            "data.mmc4.seq_len=64", "train.steps=3", "checkpoint.every=1", "checkpoint.keep_last=3",
            f"parallel.zero_stage={zero}", "optim.lr=1e-2", f"train.output_dir={out}"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    assert [records[s]["skipped_steps"] for s in (1, 2, 3)] == [0, 1, 1]
    assert records[2]["loss"] != records[2]["loss"] or records[2]["loss"] in ("nan", "inf")  # NaN logged

    def trainable(step):
        path = out / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
        return torch.load(path, weights_only=False)["module"]

    one, two, three = trainable(1), trainable(2), trainable(3)
    assert all(torch.equal(one[k], two[k]) for k in one), "a skipped step moved parameters"
    assert any(not torch.equal(two[k], three[k]) for k in two), "training stopped after the skip"
    assert all(torch.isfinite(v).all() for v in three.values())
