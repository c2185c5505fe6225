"""What the loop keeps between steps besides the engine: counters, the preemption flag, a test hold.

`hold_for_test` is the one test-only hook of the loop: with `MEGAFLAMINGO_HOLD_AT_STEP=K` and
`MEGAFLAMINGO_HOLD_MARKER=PATH` in the environment, rank 0 stops after step K (before the
preemption check and step K's checkpoint), writes PATH and blocks until SIGTERM/SIGINT arrives;
the other ranks wait in the next collective. A test then signals a run provably held at step K
instead of racing a signal against training.
"""

from __future__ import annotations

import os
import select
import signal
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Optional

HOLD_AT_STEP = "MEGAFLAMINGO_HOLD_AT_STEP"
HOLD_MARKER = "MEGAFLAMINGO_HOLD_MARKER"


@dataclass
class Counters:
    """What a resumed run must continue counting."""

    step: int = 0
    skipped_steps: int = 0
    skipped_in_a_row: int = 0
    samples: int = 0


class TrainingAborted(RuntimeError):
    """Too many NaN/Inf steps in a row (`train.max_skipped_steps_in_a_row`): every rank stops."""


class Preemption:
    """SIGTERM / SIGINT set a flag; the loop saves at the next step boundary and exits cleanly."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self.requested = True


def _wait_for_signal(read_fd: int) -> None:
    """Block until the wakeup fd carries SIGTERM or SIGINT (no timeout, no polling)."""
    wanted = {int(s) for s in Preemption.SIGNALS}
    while True:
        select.select([read_fd], [], [])  # retried by Python on EINTR (PEP 475)
        if wanted & set(os.read(read_fd, 64)):
            return


def hold_for_test(step: int, rank: int, preemption: Preemption) -> None:
    """Test-only pause point (module docstring); a no-op unless the environment asks for `step`.

    The signal is caught through a wakeup fd installed before the marker is written, so one sent
    after the marker appears cannot be missed, whichever thread the kernel delivers it to.
    """
    if rank != 0 or os.environ.get(HOLD_AT_STEP) != str(step):
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd)
    try:
        Path(os.environ[HOLD_MARKER]).write_text(f"{os.getpid()} held at step {step}\n")
        _wait_for_signal(read_fd)
    finally:
        signal.set_wakeup_fd(previous)
        os.close(read_fd)
        os.close(write_fd)
    preemption.requested = True
