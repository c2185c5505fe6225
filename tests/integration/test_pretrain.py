"""launcher/pretrain.py through the real `deepspeed` launcher on 2 CPU ranks: training, checkpoints,
exact resume after SIGKILL and after SIGTERM (the preemption path), and one-line config errors.

Each launch costs ~20-40 s on 2 cores, so one uninterrupted reference run per layout is shared by
the kill/resume checks. A signal never races training: the run is held at a known step by the
loop's test hold (`training.run_state.hold_for_test`) and signalled while it provably waits there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import psutil
import pytest
import torch

from megaflamingo.training.checkpoint import latest_checkpoint, staging_name
from megaflamingo.training.metrics import read_metrics
from megaflamingo.training.run_state import HOLD_AT_STEP, HOLD_MARKER
from tests.assets import make_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("pretrain")
    tok = make_bpe_tokenizer(base / "tok", vocab_size=257)
    from megaflamingo.data.easyvqa import write_easy_vqa

    write_easy_vqa(base / "data", limit=120, shard_size=30)
    return base, tok


def _overrides(assets: tuple[Path, Path], out: Path, extra: Sequence[str] = ()) -> list[str]:
    base, tok = assets
    return [f"model.tokenizer={tok}", f"data.laion.shards={base}/data/laion/*.tar",
            f"data.mmc4.shards={base}/data/mmc4/*.tar", "data.mmc4_options.min_image_bytes=0",
            "data.laion.batch_size=4", "data.mmc4.batch_size=2", "data.mmc4.seq_len=64",
            f"train.steps={STEPS}", "checkpoint.every=2", "checkpoint.keep_last=3", "optim.lr=3e-3",
            f"train.output_dir={out}", *extra]


def _launch(assets: tuple[Path, Path], out: Path, extra: Sequence[str] = (), ranks: int = 2,
            env: dict[str, str] | None = None) -> subprocess.Popen:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **(env or {}))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
           "--master_port", str(29500 + os.getpid() % 1000), "launcher/pretrain.py",
           "--config", "configs/tiny.yaml", *_overrides(assets, out, extra)]
    log = open(out.parent / f"{out.name}.log", "a")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _run(assets: tuple[Path, Path], out: Path, extra: Sequence[str] = ()) -> None:
    proc = _launch(assets, out, extra)
    assert proc.wait(timeout=600) == 0, (out.parent / f"{out.name}.log").read_text()[-3000:]


def _wait_until_held(proc: subprocess.Popen, marker: Path, log: Path) -> None:
    """Wait (with a deadline) until the run says it is held; it then stays held until signalled."""
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), log.read_text()[-3000:]


def _signal_held_run(assets: tuple[Path, Path], out: Path, step: int, sig: int, extra: Sequence[str] = ()) -> int:
    """Start a run held after `step`, signal it while it is held, wait for every process of it.

    SIGKILL goes to every process (launcher included): the newest checkpoint stays step 2
    (checkpoint.every=2; the hold comes before step 4's save). SIGTERM goes to every rank, as a
    scheduler's preemption notice: the ranks save step 4 and exit 0, and so does the launcher.
    """
    marker = out.parent / f"{out.name}.held"
    proc = _launch(assets, out, extra, env={HOLD_AT_STEP: str(step), HOLD_MARKER: str(marker)})
    _wait_until_held(proc, marker, out.parent / f"{out.name}.log")
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, sig)
    else:
        ranks = [p for p in tree if any(a.startswith("--local_rank") for a in p.cmdline())]
        assert ranks, [p.cmdline() for p in tree]
        for rank in ranks:
            rank.send_signal(sig)
    _, alive = psutil.wait_procs(tree, timeout=300)
    assert not alive, alive
    return proc.wait(timeout=10)


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")}


def _final_trainable(out: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt.name == f"step_{STEPS:08d}"
    return torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


@pytest.fixture(scope="module")
def reference(assets: tuple[Path, Path]) -> Path:
    out = assets[0] / "reference"
    _run(assets, out)
    return out


def test_trains_logs_and_checkpoints(reference: Path) -> None:
    losses = _losses(reference)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (6, 7, 8)) / 3
    assert last < first, losses
    record = read_metrics(reference / "metrics.jsonl")[-1]
    for key in ("loss_laion", "loss_mmc4", "lr", "samples_per_s", "tokens_per_s", "images_per_s"):
        assert key in record
    assert (reference / "config.yaml").is_file()
    frozen_free = _final_trainable(reference)
    assert frozen_free and all(not k.startswith("model.lm.layers") for k in frozen_free)  # frozen not written


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_resume_is_exact(assets: tuple[Path, Path], reference: Path, sig: signal.Signals) -> None:
    out = assets[0] / f"killed-{sig.name}"
    code = _signal_held_run(assets, out, step=4, sig=sig)
    killed_at = int(latest_checkpoint(out / "checkpoints").name.split("_")[1])
    if sig == signal.SIGTERM:  # preemption: saved at the step it was held at, clean exit
        assert code == 0 and killed_at == 4, (code, killed_at)
    else:
        assert killed_at == 2
    _run(assets, out)  # auto-resumes from the newest checkpoint
    ref, got = _losses(reference), _losses(out)
    for step in range(killed_at + 1, STEPS + 1):
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=0), (step, got[step], ref[step])
    want, have = _final_trainable(reference), _final_trainable(out)
    assert want.keys() == have.keys()
    for key in want:
        assert torch.equal(want[key], have[key]), key


# Put on the ranks' PYTHONPATH: torch.save of step 4's per-rank extra state (written after DeepSpeed's
# own files, before the commit) announces itself and hangs, so the test can SIGKILL inside the save.
HANG_IN_SAVE = """
import os
if os.environ.get("MF_TEST_HANG_IN_SAVE"):
    import time
    import torch
    _save = torch.save
    def save(obj, f, *args, **kwargs):
        if ".staging_00000004" in str(f) and "extra_rank" in str(f):
            with open(os.environ["MF_TEST_HANG_IN_SAVE"], "a") as marker:
                marker.write(str(f) + "\\n")
            time.sleep(600)
        return _save(obj, f, *args, **kwargs)
    torch.save = save
"""


def test_sigkill_during_a_save_leaves_previous_checkpoint_used(assets: tuple[Path, Path], reference: Path, tmp_path: Path) -> None:
    """SIGKILL while step 4 is being saved: step 2 stays the latest, resume uses it, the run ends exact."""
    out = assets[0] / "killed-in-save"
    hook, marker = tmp_path / "hook", tmp_path / "in-save"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HANG_IN_SAVE)
    proc = _launch(assets, out, env={"PYTHONPATH": str(hook), "MF_TEST_HANG_IN_SAVE": str(marker)})
    _wait_until_held(proc, marker, out.parent / f"{out.name}.log")  # held inside the save
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=120)
    staging = out / "checkpoints" / staging_name(4)
    assert (staging / "mp_rank_00_model_states.pt").is_file()  # DeepSpeed's part of the save was written
    assert latest_checkpoint(out / "checkpoints").name == "step_00000002"
    _run(assets, out)  # resumes from step 2
    ref, got = _losses(reference), _losses(out)
    for step in range(3, STEPS + 1):
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=0), (step, got[step], ref[step])
    want, have = _final_trainable(reference), _final_trainable(out)
    assert want.keys() == have.keys() and all(torch.equal(want[k], have[k]) for k in want)
    assert not staging.exists()


def test_config_errors_exit_2_with_one_line(assets: tuple[Path, Path], tmp_path: Path) -> None:
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    cases = [(["optim.lrr=1"], "unknown key 'optim.lrr' (did you mean 'lr'?)"),
             (["parallel.pp=2", "parallel.zero_stage=2"], "supports ZeRO stage 0 or 1 only"),
             (["parallel.tp=3"], "does not divide"),
             (["data.laion.shards=/nonexistent/*.tar"], "no file matches")]
    for overrides, message in cases:
        cmd = [sys.executable, "launcher/pretrain.py", "--config", "configs/tiny.yaml",
               *_overrides(assets, tmp_path / "bad"), *overrides]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
        assert proc.returncode == 2, (overrides, proc.stderr[-2000:])
        assert len(lines) == 1 and message in lines[0], (overrides, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr


def test_illegal_layout_under_the_launcher_fails_before_work(assets: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "layout"
    out.mkdir()
    proc = _launch(assets, out / "run", extra=["parallel.pp=2", "parallel.tp=2"])
    assert proc.wait(timeout=300) != 0
    log = (out / "run.log").read_text()
    assert "error: parallel: tp*pp = 2*2 = 4 does not divide the world size 2" in log
    assert not (out / "run" / "metrics.jsonl").exists()


def test_resume_is_exact_with_tensor_parallelism(assets: tuple[Path, Path]) -> None:
    """TP=2 on the 2 ranks: each rank's shard file resumes exactly too."""
    layout = ["parallel.tp=2"]
    ref, out = assets[0] / "tp2-reference", assets[0] / "tp2-killed"
    _run(assets, ref, layout)
    _signal_held_run(assets, out, step=4, sig=signal.SIGKILL, extra=layout)
    killed_at = int(latest_checkpoint(out / "checkpoints").name.split("_")[1])
    _run(assets, out, layout)
    want, have = _losses(ref), _losses(out)
    for step in range(killed_at + 1, STEPS + 1):
        assert have[step] == pytest.approx(want[step], rel=1e-6, abs=0), step
    for shard in ("mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"):
        a = torch.load(latest_checkpoint(ref / "checkpoints") / shard, weights_only=False)["module"]
        b = torch.load(latest_checkpoint(out / "checkpoints") / shard, weights_only=False)["module"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), shard
