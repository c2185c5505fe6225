"""Run logging on rank 0: console lines, `<output_dir>/metrics.jsonl`, TensorBoard, optional W&B.

One JSON object per logged step (at least `step` and `loss`), appended and flushed at once so a
killed run keeps every line it logged. TensorBoard is used when installed, W&B only when a project
is configured; neither is required.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional


def _scalar(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf: keep them readable instead of invalid
    return value


class MetricsLogger:
    """Writes metrics for rank 0; every other rank gets a logger that does nothing.

    Args:
        output_dir: the run directory (created if missing).
        enabled: False on ranks other than 0.
        tensorboard: write TensorBoard events when `torch.utils.tensorboard` imports.
        wandb_project: a W&B project name, or None for no W&B.
        resume: True to append to an existing metrics.jsonl (a resumed run).
    """

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 wandb_project: Optional[str] = None, resume: bool = False) -> None:
        self.enabled = enabled
        self._file = self._tb = self._wandb = None
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        self._file = open(self.path, "a" if resume else "w", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self._tb = None
        if wandb_project:
            import wandb

            self._wandb = wandb.init(project=wandb_project, dir=str(out), resume="allow")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record one step's metrics (nested dicts are flattened as `a/b`)."""
        if not self.enabled:
            return
        flat = {"step": step}
        for key, value in metrics.items():
            if isinstance(value, dict):
                flat.update({f"{key}/{k}": _scalar(v) for k, v in value.items()})
            else:
                flat[key] = _scalar(value)
        self._file.write(json.dumps(flat) + "\n")
        self._file.flush()
        numeric = {k: v for k, v in flat.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
