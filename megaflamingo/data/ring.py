"""Shared-memory step buffers: DataLoader workers write a step's images straight into one tensor
that the main process hands out, so assembling a step from several workers copies nothing.

    ring = StepRing(slots=5, rows=[8, 8], image_shape=(M, 1, 3, H, W))   # before the workers start
    out = ring.claim(step, worker)       # in worker `worker`: its rows of the step's slot, or None
    images = ring.assemble(step, parts)  # in the main process: (sum(rows), M, 1, 3, H, W)
    ring.collect()                       # release slots the consumer no longer references

Without the ring, each worker allocates a fresh shared-memory tensor per step (a new file,
mapped and page-faulted on both sides) and the main process concatenates the workers' tensors
into a third one (another ~10-60 MB written per step). With it, a slot is written in place and
the step's images are views of it.

Safety does not depend on timing: worker w writes its rows of slot k only after the main process
released them, which it does only when no tensor outside the ring references the slot's storage
any more (the consumer dropped every view of it). A worker that finds its rows still in use
writes a tensor of its own instead, and the main process concatenates as before for that step.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def _use_count(tensor: torch.Tensor) -> int:
    """References to the tensor's storage (every view of it counts one)."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


def ring_supported() -> bool:
    """Whether this torch exposes storage reference counts (without them the ring is not used)."""
    return hasattr(torch._C, "_storage_Use_Count")


class StepRing:
    """`slots` step-sized image buffers in shared memory, reused round-robin.

    Args:
        slots: buffers; step n uses slot n % slots.
        rows: samples each worker contributes per step, in worker order.
        image_shape: (M, 1, 3, H, W) of one sample's images.
    """

    def __init__(self, slots: int, rows: Sequence[int], image_shape: Sequence[int]) -> None:
        self.bounds = [sum(rows[:w]) for w in range(len(rows) + 1)]
        self.buffers = [torch.empty((self.bounds[-1], *image_shape)).share_memory_()
                        for _ in range(slots)]  # (rows of the rank, M, 1, 3, H, W) each
        self.free = torch.ones((slots, len(rows)), dtype=torch.uint8).share_memory_()
        """free[k, w] = 1: worker w may write its rows of slot k (set by the main process only)."""
        self._idle = [_use_count(b) for b in self.buffers]
        self._handed: list[int] = []

    def _rows(self, slot: int, worker: int) -> torch.Tensor:
        return self.buffers[slot][self.bounds[worker]:self.bounds[worker + 1]]

    def claim(self, step: int, worker: int) -> Optional[torch.Tensor]:
        """Worker side: worker `worker`'s rows of step `step`'s slot, now its to write, or None
        when the main process has not released them (write a tensor of your own then)."""
        slot = step % len(self.buffers)
        if not self.free[slot, worker]:
            return None
        self.free[slot, worker] = 0
        return self._rows(slot, worker)

    def assemble(self, step: int, parts: list[Optional[torch.Tensor]]) -> torch.Tensor:
        """Main side: the step's images, from each worker's part (None: written in the slot).

        Returns the slot itself when every worker wrote there (handed out until `collect` sees
        it unreferenced), else a concatenation, after which the slot rows are released at once.
        """
        slot = step % len(self.buffers)
        if all(part is None for part in parts):
            self._handed.append(slot)
            return self.buffers[slot]
        images = torch.cat([self._rows(slot, w) if part is None else part
                            for w, part in enumerate(parts)])
        for w, part in enumerate(parts):
            if part is None:
                self.free[slot, w] = 1
        return images

    def collect(self) -> None:
        """Main side: release every handed-out slot that nothing outside the ring references."""
        held = []
        for slot in self._handed:
            if _use_count(self.buffers[slot]) > self._idle[slot]:
                held.append(slot)
            else:
                self.free[slot] = 1
        self._handed = held
