"""Elastic layouts through `launcher/pretrain.py` under the real `deepspeed` launcher (tiny config,
fp32): the same losses on every layout, and checkpoints that resume on another layout.

- 1 rank, DP2, DP4, TP2 x DP2 ZeRO-3 and TP2 x PP2 x DP2 ZeRO-1 (8 ranks), with 1 or 2 data
  workers, log the single-rank losses (rel <= 1e-5): 8 canonical readers deal the same global
  batches to every layout (data/dealing.py) and the per-sample loss is layout-invariant.
- The 8-rank run stops after step 4; the run directory resumes on 1 rank (held after step 5 and
  SIGKILLed first: the source checkpoint stays the latest, byte for byte, and resumes again), then
  `launcher/convert.py reshard` sets it up for TP2 x DP2 ZeRO-3, which trains steps 7-8: steps 5-8
  and the final trainable tensors equal the uninterrupted single-rank run (rel <= 1e-5).

Each launch costs ~15-60 s on 2 cores: 8 launches in all, the 8-rank and single-rank runs shared.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megaflamingo.training.checkpoint import latest_checkpoint
from megaflamingo.training.layout_free import read_layout_free
from megaflamingo.training.metrics import read_metrics
from megaflamingo.training.run_state import HOLD_AT_STEP, HOLD_MARKER
from tests.assets import make_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8
pytestmark = pytest.mark.integration

EIGHT_RANKS = ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1", "data.workers=1"]
LAYOUTS = {  # id: (ranks, overrides); each runs 3 steps
    "dp2-2workers": (2, ["data.workers=2"]),
    "dp4-1worker": (4, ["data.workers=1"]),
    "tp2-dp2-zero3-2workers": (4, ["parallel.tp=2", "parallel.zero_stage=3", "data.workers=2"]),
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("elastic")
    tok = make_bpe_tokenizer(base / "tok", vocab_size=257)
    from megaflamingo.data.easyvqa import write_easy_vqa

    write_easy_vqa(base / "data", limit=120, shard_size=30)
    return base, tok


def overrides(assets: tuple[Path, Path], out: Path, steps: int, every: int) -> list[str]:
    """The run config: 8 canonical readers, global batches of 8 + 8 samples."""
    base, tok = assets
    return [f"model.tokenizer={tok}", f"data.laion.shards={base}/data/laion/*.tar",
            f"data.mmc4.shards={base}/data/mmc4/*.tar", "data.mmc4_options.min_image_bytes=0",
            "data.laion.batch_size=8", "data.mmc4.batch_size=8", "data.mmc4.seq_len=64",
            "data.canonical_readers=8", "train.precision=fp32", "optim.lr=3e-3",
            f"train.steps={steps}", f"checkpoint.every={every}", "logging.tensorboard=false",
            f"train.output_dir={out}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(ranks: int, out: Path, args: list[str], env: dict | None = None) -> subprocess.Popen:
    """`deepspeed --num_gpus RANKS launcher/pretrain.py ARGS` on CPU; output goes to OUT.log."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", **(env or {}))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
           "--master_port", str(_free_port()), "launcher/pretrain.py", *args]
    log = open(out.parent / f"{out.name}.log", "a")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def run(ranks: int, out: Path, args: list[str]) -> None:
    proc = launch(ranks, out, args)
    assert proc.wait(timeout=900) == 0, (out.parent / f"{out.name}.log").read_text()[-3000:]


def train(assets, out: Path, ranks: int, extra: list[str], steps: int = 3, every: int = 0) -> None:
    run(ranks, out, ["--config", "configs/tiny.yaml", *overrides(assets, out, steps, every), *extra])


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")}


def assert_same_losses(got: dict, want: dict, steps) -> None:
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=0), (step, got, want)


@pytest.fixture(scope="module")
def single_rank(assets) -> Path:
    """The reference: one rank, one data worker, 8 steps uninterrupted (checkpoint at the end)."""
    out = assets[0] / "single"
    train(assets, out, 1, ["data.workers=1"], steps=STEPS, every=STEPS)
    return out


@pytest.fixture(scope="module")
def eight_ranks(assets) -> Path:
    """TP2 x PP2 x DP2 ZeRO-1 (8 ranks), stopped after step 4 (its checkpoint)."""
    out = assets[0] / "eight"
    train(assets, out, 8, EIGHT_RANKS, steps=4, every=4)
    return out


@pytest.mark.parametrize("layout", [*LAYOUTS, "tp2-pp2-dp2-zero1-1worker"])
def test_every_layout_logs_the_single_rank_losses(assets, single_rank, eight_ranks, layout):
    out = eight_ranks
    if layout in LAYOUTS:
        ranks, extra = LAYOUTS[layout]
        out = assets[0] / layout
        train(assets, out, ranks, extra)
    want, got = losses(single_rank), losses(out)
    assert sorted(got) == list(range(1, len(got) + 1)) and len(got) >= 3
    assert_same_losses(got, want, got)
    assert len({round(want[s], 3) for s in got}) == len(got)  # the steps really differ


def _digests(step_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(step_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(step_dir.rglob("*")) if p.is_file()}


def _kill_when_held(ranks: int, out: Path, args: list[str], step: int, marker: Path) -> None:
    """Start a run held after `step` (the loop's test hold), SIGKILL every process of it there."""
    proc = launch(ranks, out, args, env={HOLD_AT_STEP: str(step), HOLD_MARKER: str(marker)})
    deadline = time.time() + 900
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), (out.parent / f"{out.name}.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=120)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| of one tensor (element-wise, Adam turns rounding-level gradient
    differences of near-zero-gradient elements into lr-sized steps on any two layouts)."""
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_a_checkpoint_resumes_on_other_layouts(assets, single_rank, eight_ranks, tmp_path):
    run_dir = assets[0] / "moved"
    shutil.copytree(eight_ranks, run_dir)
    source = latest_checkpoint(run_dir / "checkpoints")
    assert source.name == "step_00000004"
    before = _digests(source)
    one_rank = ["--config", "configs/tiny.yaml", *overrides(assets, run_dir, 6, 2), "data.workers=2"]
    _kill_when_held(1, run_dir, one_rank, 5, tmp_path / "held")  # resharded, trained step 5
    assert latest_checkpoint(run_dir / "checkpoints") == source and _digests(source) == before
    run(1, run_dir, one_rank)  # TP2 x PP2 x DP2 -> 1 rank, steps 5-6, saves step 6

    out = assets[0] / "resharded"
    code = subprocess.run([sys.executable, "launcher/convert.py", "reshard", str(run_dir),
                           "--tp", "2", "--zero-stage", "3", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    assert code.returncode == 0, code.stderr
    assert latest_checkpoint(out / "checkpoints").name == "step_00000006"
    run(4, out, ["--config", str(out / "config.yaml"), f"train.steps={STEPS}"])  # TP2 x DP2 ZeRO-3

    want, got = losses(single_rank), losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert_same_losses(got, want, range(5, STEPS + 1))
    final, _ = read_layout_free(latest_checkpoint(out / "checkpoints"))
    reference, _ = read_layout_free(latest_checkpoint(single_rank / "checkpoints"))
    assert final.keys() == reference.keys() and reference
    worst = max(_rel(final[k][t], reference[k][t]) for k in reference
                for t in ("param", "exp_avg", "exp_avg_sq"))
    assert worst <= 1e-5, worst


def test_what_cannot_be_mapped_is_one_line(eight_ranks, tmp_path):
    for args, message in ((["--tp", "3"], "tp=3"), (["--tp", "2", "--pp", "9"], "pp=9")):
        out = tmp_path / f"out{len(message)}{args[-1]}"
        code = subprocess.run([sys.executable, "launcher/convert.py", "reshard", str(eight_ranks),
                               *args, "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
        assert code.returncode == 2 and message in code.stderr, code.stderr
        assert len(code.stderr.strip().splitlines()) == 1 and not out.exists()
