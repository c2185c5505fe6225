"""metrics.jsonl: one flushed JSON object per logged step; non-zero ranks write nothing."""

from __future__ import annotations

from pathlib import Path

import torch

from megaflamingo.training.metrics import MetricsLogger, read_metrics


def test_jsonl_records_and_resume(tmp_path: Path) -> None:
    log = MetricsLogger(tmp_path, tensorboard=False)
    log.log(1, {"loss": torch.tensor(2.5), "skipped": {"corrupt_image": 3}, "lr": 1e-4})
    log.log(2, {"loss": float("nan")})
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]  # flushed already
    log.close()
    again = MetricsLogger(tmp_path, tensorboard=False, resume=True)
    again.log(3, {"loss": 1.0})
    again.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[0] == {"step": 1, "loss": 2.5, "skipped/corrupt_image": 3, "lr": 1e-4}
    assert records[1]["loss"] == "nan" and records[2] == {"step": 3, "loss": 1.0}


def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    log = MetricsLogger(tmp_path / "run", enabled=False)
    log.log(1, {"loss": 1.0})
    log.close()
    assert not (tmp_path / "run").exists()
