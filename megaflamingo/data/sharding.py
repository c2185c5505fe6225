"""Which samples each reader sees, in which order, per epoch; positions; per-sample RNG.

A *reader* is one of the S = C canonical virtual readers of a stream (dealing.py): S depends on
the config's batch sizes (or `data.canonical_readers`), never on dp or the worker count, which
only decide who runs which reader. Everything here is a pure function of (seed, stream, epoch),
so a reader's position alone is enough to resume it exactly, on any layout:

- *Units.* Each shard is one unit; with fewer shards than readers, each shard is split into
  P = ceil(S / num_shards) units by sample index modulo P, so every reader has work and the units
  of an epoch still cover every sample exactly once.
- *Epoch order.* The units are shuffled with an RNG seeded from (seed, stream, epoch) and dealt
  round-robin: reader s gets units s, s + S, s + 2S, ... Readers are disjoint and together cover
  the epoch. With `resampled`, each reader instead draws ceil(num_units / S) shards with
  replacement from (seed, stream, epoch, reader), as OpenFlamingo's --dataset_resampled does.
- *Sample order.* Inside a unit, samples are shuffled in consecutive blocks of `shuffle_block`
  samples (0 or 1: file order), each block with its own seeded permutation.
- *Position.* (epoch, unit_pos, sample_pos): the next unit of the reader's epoch list and the
  next sample in that unit's shuffled order.
- *Per-sample RNG.* Seeded from (seed, stream, epoch, shard, index in shard) -- plus the draw for
  resampled readers -- so a sample's flip and keep coins do not depend on the layout or history.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import asdict, dataclass
from typing import Iterator

from megaflamingo.data.shards import RawSample, read_shard

MAX_EMPTY_EPOCHS = 10
"""Consecutive epochs without a (usable) sample after which a reader gives up with an error."""


def derive_seed(*parts) -> int:
    """A 64-bit seed from any tuple of ints/strings, stable across processes and runs."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True)
class Unit:
    """A slice of one shard: the samples whose index % num_pieces == piece."""

    shard: int
    piece: int = 0
    num_pieces: int = 1
    draw: int = -1
    """For resampled readers: (reader, draw number), else -1; part of the per-sample RNG seed."""


@dataclass(frozen=True)
class Position:
    """Where a reader is: the next sample to read is sample `sample_pos` of unit `unit_pos`."""

    epoch: int = 0
    unit_pos: int = 0
    sample_pos: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StreamPlan:
    """The deterministic reading plan of one stream for S readers."""

    shards: tuple
    num_readers: int
    seed: int
    stream: str
    resampled: bool = False
    shuffle_block: int = 0

    @property
    def num_pieces(self) -> int:
        return 1 if self.resampled else max(1, math.ceil(self.num_readers / len(self.shards)))

    def units(self, epoch: int, reader: int) -> list[Unit]:
        """The units reader `reader` reads in `epoch`, in order."""
        if self.resampled:
            rng = random.Random(derive_seed(self.seed, self.stream, "resample", epoch, reader))
            count = max(1, math.ceil(len(self.shards) / self.num_readers))
            return [Unit(rng.randrange(len(self.shards)), draw=reader * count + d)
                    for d in range(count)]
        pieces = self.num_pieces
        units = [Unit(s, p, pieces) for s in range(len(self.shards)) for p in range(pieces)]
        random.Random(derive_seed(self.seed, self.stream, "order", epoch)).shuffle(units)
        return units[reader :: self.num_readers]

    def sample_rng(self, epoch: int, unit: Unit, index: int) -> random.Random:
        """The RNG of sample `index` (position in its shard) of `unit` in `epoch`."""
        return random.Random(derive_seed(self.seed, self.stream, epoch, unit.shard, unit.draw, index))

    def block_order(self, epoch: int, unit: Unit, block: int, length: int) -> list[int]:
        """The shuffled order of one block of a unit (identity without shuffling)."""
        order = list(range(length))
        if self.shuffle_block > 1:
            seed = derive_seed(self.seed, self.stream, "block", epoch, unit, block)
            random.Random(seed).shuffle(order)
        return order


def _block_size(plan: StreamPlan) -> int:
    return plan.shuffle_block if plan.shuffle_block > 1 else 1


def iter_unit(plan: StreamPlan, epoch: int, unit: Unit,
              start: int) -> Iterator[tuple[int, RawSample]]:
    """Yield (sample_pos after this sample, raw sample) of one unit from position `start`.

    Blocks before the one holding `start` are skipped without reading their data.
    """
    size = _block_size(plan)
    first_block = start // size

    def wanted(index: int) -> bool:
        return index % unit.num_pieces == unit.piece and index // unit.num_pieces >= first_block * size

    block, buffer = first_block, []
    for raw in read_shard(plan.shards[unit.shard], wanted):
        buffer.append(raw)
        if len(buffer) == size:
            yield from _emit_block(plan, epoch, unit, block, buffer, start)
            block, buffer = block + 1, []
    if buffer:
        yield from _emit_block(plan, epoch, unit, block, buffer, start)


def _emit_block(plan: StreamPlan, epoch: int, unit: Unit, block: int, buffer: list,
                start: int) -> Iterator[tuple[int, RawSample]]:
    base = block * _block_size(plan)
    for offset, j in enumerate(plan.block_order(epoch, unit, block, len(buffer))):
        if base + offset >= start:
            yield base + offset + 1, buffer[j]


def iter_reader(plan: StreamPlan, reader: int,
                position: Position) -> Iterator[tuple[Position, Unit, int, RawSample]]:
    """Yield (position after, unit, epoch, raw sample) forever, epoch after epoch.

    Args:
        plan: the stream plan.
        reader: this reader's index in [0, S).
        position: where to start.
    Raises:
        RuntimeError: `MAX_EMPTY_EPOCHS` epochs in a row held no sample at all (empty shards).
    """
    epoch, unit_pos, sample_pos = position.epoch, position.unit_pos, position.sample_pos
    empty_epochs = 0
    while True:
        units, found = plan.units(epoch, reader), False
        while unit_pos < len(units):
            unit = units[unit_pos]
            for after, raw in iter_unit(plan, epoch, unit, sample_pos):
                found = True
                yield Position(epoch, unit_pos, after), unit, epoch, raw
            unit_pos, sample_pos = unit_pos + 1, 0
        empty_epochs = 0 if found else empty_epochs + 1
        if empty_epochs >= MAX_EMPTY_EPOCHS:
            raise RuntimeError(f"data stream '{plan.stream}': reader {reader} found no sample in "
                               f"{empty_epochs} epochs in a row; are the shards empty?")
        epoch, unit_pos = epoch + 1, 0
