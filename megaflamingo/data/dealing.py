"""Elastic determinism: how C virtual readers deal every global batch, and who reads which reader.

The sample order of a run is a function of (seed, shard list, global batch sizes) only, never of
the data-parallel size or the DataLoader worker count:

- *Canonical readers.* Every stream is read by the same C virtual readers
  (`data.canonical_readers`; 0 = the largest divisor of the gcd of the enabled streams'
  `batch_size`s that is at most `DEFAULT_MAX_READERS`). Reader v's
  sample sequence is fixed by the stream plan (sharding.py: units of an epoch dealt round-robin
  to the C readers, seeded per epoch), bad samples included: a reader skips exactly the samples
  its own preprocessing rejects, so its sequence of good samples is deterministic too.
- *Dealing.* The global batch of a stream with `batch_size` B is the concatenation, in reader
  order, of the next B / C good samples of each reader v = 0 .. C-1. Every reader advances by
  B / C samples per step.
- *DP slices.* DP rank r of dp takes the contiguous slice [r B/dp, (r+1) B/dp) of every global
  batch; since dp divides C that is exactly the readers [r C/dp, (r+1) C/dp): each rank reads its
  own readers and no other. TP peers and pipeline stages of one replica read the same readers.
- *Workers.* A rank's C/dp readers are split into min(workers, C/dp) runs of consecutive
  readers, one per DataLoader worker; more workers than readers would idle, so they are not
  started.
- *Resume state.* One position (and skip count) per virtual reader; a rank's state holds its own
  readers, and the states of all DP ranks merged (`merge_states`) are the global state, which
  any (dp, workers) layout loads.

Constraints (ConfigError at start): C divides every enabled stream's `batch_size`, and every dp
the run will use divides C. To move a run between layouts choose C up front, e.g. C = the largest
dp you plan to use (C = 1 works on one rank only). More readers per rank than workers is fine.
"""

from __future__ import annotations

import math
from typing import Optional

from megaflamingo.config import ConfigError

STATE_FORMAT = 2
"""Version of the loader state (1: per-rank readers of turn 1, not loadable any more)."""

DEFAULT_MAX_READERS = 256
"""Cap of the automatic reader count: each reader holds an open shard and its shuffle block, and a
rank holds C / dp of them (at dp = 1 all C), so C is kept moderate unless configured."""


def canonical_count(configured: int, batch_sizes: dict[str, int]) -> int:
    """C: the configured canonical reader count, or, when 0, the largest divisor of the gcd of
    the global batch sizes that is at most `DEFAULT_MAX_READERS`.

    Args:
        configured: `data.canonical_readers` (0 = automatic).
        batch_sizes: {stream: global batch size} of the enabled streams.
    Returns:
        C >= 1.
    Raises:
        ConfigError: C is negative or does not divide a stream's batch size.
    """
    if configured < 0:
        raise ConfigError(f"data.canonical_readers must be >= 0 (0: automatic), got {configured}")
    common = math.gcd(*batch_sizes.values())
    count = configured or max(d for d in range(1, min(common, DEFAULT_MAX_READERS) + 1)
                              if common % d == 0)
    for name, size in batch_sizes.items():
        if size < 1 or size % count:
            raise ConfigError(f"data.{name}.batch_size={size} is not a multiple of "
                              f"data.canonical_readers={count} (every reader adds "
                              f"batch_size / canonical_readers samples to each step)")
    return count


def rank_readers(count: int, dp_rank: int, dp_size: int) -> list[int]:
    """The virtual readers DP rank `dp_rank` reads: [r C/dp, (r+1) C/dp).

    Raises:
        ConfigError: dp does not divide C.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
    if count % dp_size:
        raise ConfigError(f"the data-parallel size {dp_size} does not divide "
                          f"data.canonical_readers={count}; set data.canonical_readers to a "
                          f"multiple of every dp this run will use (it must divide the batch sizes)")
    share = count // dp_size
    return list(range(dp_rank * share, (dp_rank + 1) * share))


def worker_readers(readers: list[int], workers: int) -> list[list[int]]:
    """Readers per DataLoader worker: W = min(workers, len) consecutive runs, sizes within one.

    Consecutive readers fill consecutive rows of the rank's slice, so each worker collates its
    part of a step into one batch. `workers` 0 means "in the main process": one group.
    """
    groups = max(1, min(workers, len(readers)))
    size, extra = divmod(len(readers), groups)
    bounds = [w * size + min(w, extra) for w in range(groups + 1)]
    return [readers[bounds[w]:bounds[w + 1]] for w in range(groups)]


def merge_states(states: list[dict]) -> dict:
    """One global loader state from the per-rank states of every DP rank (TP peers may repeat).

    Args:
        states: `TrainLoader.state_dict()` of each rank (any order).
    Returns:
        A state holding every reader any rank held, loadable by any layout.
    Raises:
        ValueError: the states come from different runs (layouts of the order differ), or two
            ranks disagree on a reader's position.
    """
    merged: dict = {}
    for state in states:
        for name, stream in state.items():
            into = merged.setdefault(name, {**stream, "readers": {}})
            if into["order"] != stream["order"]:
                raise ValueError(f"data state of stream '{name}': ranks were saved with different "
                                 f"orders: {into['order']} vs {stream['order']}")
            for reader, entry in stream["readers"].items():
                known: Optional[dict] = into["readers"].get(reader)
                if known is not None and known != entry:
                    raise ValueError(f"data state of stream '{name}': reader {reader} is saved at "
                                     f"two different positions ({known} vs {entry})")
                into["readers"][reader] = entry
    return merged
