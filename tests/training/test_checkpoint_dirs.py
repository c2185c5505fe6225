"""Checkpoint directory policy: atomic commit, keep-last-K, a killed save never wins."""

from __future__ import annotations

from pathlib import Path

from megaflamingo.training.checkpoint import (
    commit_checkpoint,
    complete_checkpoints,
    latest_checkpoint,
    staging_name,
)


def _save(root: Path, step: int, payload: str = "x") -> None:
    staging = root / staging_name(step)
    staging.mkdir(parents=True)
    (staging / "extra_rank0.pt").write_text(payload)


def test_commit_keeps_last_k_and_points_latest(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        _save(tmp_path, step)
        commit_checkpoint(tmp_path, step, keep_last=2)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [20, 30]
    assert latest_checkpoint(tmp_path).name == "step_00000030"
    assert (tmp_path / "latest").read_text() == "step_00000030"


def test_killed_save_leaves_previous_checkpoint_in_use(tmp_path: Path) -> None:
    _save(tmp_path, 10, "good")
    commit_checkpoint(tmp_path, 10, keep_last=3)
    _save(tmp_path, 20, "half-written")  # killed before commit: never renamed
    assert latest_checkpoint(tmp_path).name == "step_00000010"
    assert (latest_checkpoint(tmp_path) / "extra_rank0.pt").read_text() == "good"
    _save(tmp_path, 30)
    commit_checkpoint(tmp_path, 30, keep_last=3)
    assert not (tmp_path / staging_name(20)).exists()  # stale staging cleaned up
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [10, 30]


def test_latest_falls_back_without_pointer(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "step_00000005").mkdir()
    (tmp_path / "step_00000007").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000007"
    (tmp_path / "latest").write_text("step_00000099")  # points at something deleted
    assert latest_checkpoint(tmp_path).name == "step_00000007"


def test_resaving_a_step_replaces_it(tmp_path: Path) -> None:
    _save(tmp_path, 10, "first")
    commit_checkpoint(tmp_path, 10, keep_last=2)
    _save(tmp_path, 10, "second")
    commit_checkpoint(tmp_path, 10, keep_last=2)
    assert (latest_checkpoint(tmp_path) / "extra_rank0.pt").read_text() == "second"
