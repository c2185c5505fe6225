"""Elastic determinism through `launcher/pretrain.py` under the real `deepspeed` launcher (tiny
config, fp32): 1 rank, DP2, DP4, TP2 x DP2 ZeRO-3 and TP2 x PP2 x DP2 ZeRO-1 (8 ranks), with 1 and
2 data workers, log the same losses step by step as one rank with one worker.

The data order is fixed by 8 canonical readers (data/dealing.py), so every layout below trains on
the same global batches; the per-sample loss is layout-invariant (training/loss.py), so the step
losses agree to float rounding (rel <= 1e-5). Each launch costs ~15-60 s on 2 cores: one run per
layout, worker counts alternating between layouts (each layout's readers per worker differ).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megaflamingo.training.metrics import read_metrics
from tests.assets import make_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3
pytestmark = pytest.mark.integration

LAYOUTS = {  # id: (ranks, overrides)
    "1rank-2workers": (1, ["data.workers=2"]),
    "dp2-2workers": (2, ["data.workers=2"]),
    "dp4-1worker": (4, ["data.workers=1"]),
    "tp2-dp2-zero3-2workers": (4, ["parallel.tp=2", "parallel.zero_stage=3", "data.workers=2"]),
    "tp2-pp2-dp2-zero1-1worker": (8, ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1",
                                      "data.workers=1"]),
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("elastic")
    tok = make_bpe_tokenizer(base / "tok", vocab_size=257)
    from megaflamingo.data.easyvqa import write_easy_vqa

    write_easy_vqa(base / "data", limit=120, shard_size=30)
    return base, tok


def overrides(assets: tuple[Path, Path], out: Path, steps: int) -> list[str]:
    """The run config: 8 canonical readers, global batches of 8 + 8 samples."""
    base, tok = assets
    return [f"model.tokenizer={tok}", f"data.laion.shards={base}/data/laion/*.tar",
            f"data.mmc4.shards={base}/data/mmc4/*.tar", "data.mmc4_options.min_image_bytes=0",
            "data.laion.batch_size=8", "data.mmc4.batch_size=8", "data.mmc4.seq_len=64",
            "data.canonical_readers=8", "train.precision=fp32", "optim.lr=3e-3",
            f"train.steps={steps}", "checkpoint.every=0", "logging.tensorboard=false",
            f"train.output_dir={out}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(assets: tuple[Path, Path], out: Path, ranks: int, extra: list[str], steps: int = STEPS,
           env: dict | None = None) -> subprocess.Popen:
    """Start `deepspeed --num_gpus RANKS launcher/pretrain.py` on CPU; output goes to OUT.log."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", **(env or {}))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
           "--master_port", str(_free_port()), "launcher/pretrain.py", "--config",
           "configs/tiny.yaml", *overrides(assets, out, steps), *extra]
    log = open(out.parent / f"{out.name}.log", "a")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def run(assets: tuple[Path, Path], out: Path, ranks: int, extra: list[str],
        steps: int = STEPS) -> None:
    proc = launch(assets, out, ranks, extra, steps)
    assert proc.wait(timeout=900) == 0, (out.parent / f"{out.name}.log").read_text()[-3000:]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")}


@pytest.fixture(scope="module")
def single_rank(assets) -> Path:
    """The reference: one rank, one data worker."""
    out = assets[0] / "single"
    run(assets, out, 1, ["data.workers=1"])
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_logs_the_single_rank_losses(assets, single_rank, layout):
    ranks, extra = LAYOUTS[layout]
    out = assets[0] / layout
    run(assets, out, ranks, extra)
    want, got = losses(single_rank), losses(out)
    assert sorted(want) == sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=0), (step, got, want)
    assert len({round(v, 3) for v in want.values()}) == STEPS  # the steps really differ
