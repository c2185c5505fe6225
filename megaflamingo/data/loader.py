"""Training data loaders: one stream per DP rank (`StreamLoader`), and the per-step mix (`TrainLoader`).

    loader = build_train_loader(cfg, tokenizer, dp_rank, dp_size)
    for step_batches in loader:          # one optimizer step: a list of micro-batch dicts
        ...
    state = loader.state_dict()          # save with the checkpoint
    loader = build_train_loader(cfg, tokenizer, dp_rank, dp_size, state=state)  # exact resume
    loader.skipped()                     # {"laion": {"bad_image": 3, ...}, "mmc4": {...}}

Each DataLoader worker w of DP rank r is reader r + dp_size * w of the stream's plan
(sharding.py). Workers yield (micro-batch, reader, position after, skip counts); torch's
DataLoader returns worker batches strictly round-robin, so the main process knows each reader's
position for everything it has handed out. The state is those positions plus which reader comes
next; a restored loader renumbers its workers so that worker 0 plays that reader, and yields the
same micro-batches the original would have yielded. Streams are infinite (epoch after epoch).

Deliberate differences from OpenFlamingo's loaders (reference §4.1, §4.7.9), for determinism and
exact resume: the shard order of an epoch comes from (seed, epoch) instead of a seeded 2000-shard
buffer; samples are shuffled in seeded blocks of `shuffle_buffer` inside a shard instead of
webdataset's 5000-sample buffer seeded from pid and time; flips and keep coins come from a
per-sample RNG; an epoch is a full pass over the shards instead of `train_num_samples` (the
training loop counts steps); fewer shards than readers splits shards by sample index instead of
asserting; bad samples are counted by reason instead of logged and forgotten.
"""

from __future__ import annotations

import random
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Optional

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megaflamingo.config import Config, ConfigError, MMC4Options, StreamConfig
from megaflamingo.data.batching import Sample, SkipSample, TextEncoder, collate
from megaflamingo.data.images import ImageTransform, build_image_transform
from megaflamingo.data.laion import preprocess_laion
from megaflamingo.data.mmc4 import preprocess_mmc4
from megaflamingo.data.sharding import MAX_EMPTY_EPOCHS, Position, StreamPlan, iter_reader
from megaflamingo.data.shards import expand_shards
from megaflamingo.data.tokenizer import FlamingoTokens, flamingo_token_ids

STREAMS = ("laion", "mmc4")
STATE_FORMAT = 1


@dataclass
class StreamSpec:
    """Everything a worker needs to produce one stream's micro-batches (picklable)."""

    name: str
    plan: StreamPlan
    dp_rank: int
    dp_size: int
    num_workers: int
    micro_batch_size: int
    seq_len: int
    max_num_media: int
    loss_weight: float
    mmc4: MMC4Options


class SampleSource:
    """Preprocesses raw samples of one stream (LAION pairs or MMC4 documents)."""

    def __init__(self, spec: StreamSpec, tokenizer, transform: ImageTransform) -> None:
        self.spec = spec
        self.encoder = TextEncoder(tokenizer, spec.seq_len)
        self.tokens: FlamingoTokens = flamingo_token_ids(tokenizer)
        self.eos_token = tokenizer.eos_token
        self.transform = transform

    def preprocess(self, fields: dict, rng: random.Random, notes: Counter) -> Sample:
        """Raw fields -> Sample, or raise SkipSample; images dropped inside go to `notes`."""
        if self.spec.name == "laion":
            return preprocess_laion(fields, self.encoder, self.tokens, self.eos_token, rng)
        return preprocess_mmc4(fields, self.encoder, self.tokens, self.eos_token, self.spec.mmc4,
                               self.spec.max_num_media, rng, notes)

    def batches(self, reader: int, position: Position,
                skipped: dict) -> Iterator[tuple[dict, Position, dict, list]]:
        """Yield (micro-batch, position after, cumulative skip counts, sample keys) forever."""
        counts, batch, keys = Counter(skipped), [], []
        plan, empty_epochs, epoch_seen = self.spec.plan, 0, position.epoch
        for after, unit, epoch, raw in iter_reader(plan, reader, position):
            if epoch != epoch_seen:
                empty_epochs, epoch_seen = empty_epochs + 1, epoch
                if empty_epochs >= MAX_EMPTY_EPOCHS:
                    raise RuntimeError(f"data stream '{self.spec.name}': reader {reader} read "
                                       f"{empty_epochs} epochs without one usable sample; skipped: "
                                       f"{dict(counts)}")
            sample = self._sample_or_count(raw, plan.sample_rng(epoch, unit, raw.index), counts)
            if sample is None:
                continue
            empty_epochs = 0
            batch.append(sample)
            keys.append(f"{plan.shards[unit.shard]}#{raw.key}")
            if len(batch) == self.spec.micro_batch_size:
                out = collate(batch, self.transform, self.spec.max_num_media, self.spec.loss_weight)
                yield out, after, dict(counts), keys
                batch, keys = [], []

    def _sample_or_count(self, raw, rng: random.Random, counts: Counter) -> Optional[Sample]:
        if raw.error is not None:
            counts[raw.error] += 1
            return None
        notes: Counter = Counter()
        try:
            return self.preprocess(raw.fields, rng, notes)
        except SkipSample as skip:
            counts[skip.reason] += 1
            return None
        finally:
            counts.update(notes)


class _ReaderDataset(IterableDataset):
    """The IterableDataset each DataLoader worker runs: one reader of the stream."""

    def __init__(self, source: SampleSource, positions: list, skipped: list, offset: int) -> None:
        self.source, self.positions, self.skipped, self.offset = source, positions, skipped, offset

    def __iter__(self):
        info = get_worker_info()
        slot = ((info.id if info is not None else 0) + self.offset) % len(self.positions)
        spec = self.source.spec
        reader = spec.dp_rank + spec.dp_size * slot
        for batch, after, counts, keys in self.source.batches(reader, self.positions[slot],
                                                              self.skipped[slot]):
            yield batch, slot, after.to_dict(), counts, keys


def _as_is(item):
    return item


class StreamLoader:
    """Infinite, resumable micro-batches of one stream for one DP rank.

    Args:
        source: the stream's preprocessing (spec, tokenizer, transform).
        state: a `state_dict()` to resume from (None: the start).
    """

    def __init__(self, source: SampleSource, state: Optional[dict] = None) -> None:
        self.source = source
        self.spec = source.spec
        slots = max(1, self.spec.num_workers)
        self._positions = [Position() for _ in range(slots)]
        self._skipped: list[dict] = [{} for _ in range(slots)]
        self._next_slot = 0
        self._iterator = None
        self.last_keys: list[str] = []
        """"shard#key" of each sample of the last micro-batch handed out."""
        if state is not None:
            self.load_state_dict(state)

    def __iter__(self) -> Iterator[dict]:
        """Micro-batches from the current state on; starting a new iteration ends the previous one."""
        self._close_previous()
        iterator = self._run()
        self._iterator = weakref.ref(iterator)  # weak: a generator <-> loader cycle delays shutdown
        return iterator

    def _close_previous(self) -> None:
        previous = self._iterator() if self._iterator is not None else None
        if previous is not None:
            previous.close()
        self._iterator = None

    def _run(self) -> Iterator[dict]:
        dataset = _ReaderDataset(self.source, list(self._positions), list(self._skipped),
                                 self._next_slot)
        workers = self.spec.num_workers
        batches = iter(DataLoader(dataset, batch_size=None, num_workers=workers,
                                  collate_fn=_as_is, prefetch_factor=2 if workers else None))
        try:
            for batch, slot, after, counts, keys in batches:
                self._positions[slot] = Position(**after)
                self._skipped[slot] = counts
                self._next_slot = (slot + 1) % len(self._positions)
                self.last_keys = keys
                yield batch
        finally:
            del batches  # shuts the workers down now

    def _layout(self) -> dict:
        plan = self.spec.plan
        return {"stream": self.spec.name, "dp_rank": self.spec.dp_rank, "dp_size": self.spec.dp_size,
                "num_workers": self.spec.num_workers, "seed": plan.seed,
                "num_shards": len(plan.shards), "micro_batch_size": self.spec.micro_batch_size}

    def state_dict(self) -> dict:
        """Positions of everything handed out so far, plus skip counts (plain data)."""
        return {"format": STATE_FORMAT, **self._layout(),
                "positions": [p.to_dict() for p in self._positions],
                "skipped": [dict(s) for s in self._skipped], "next_slot": self._next_slot}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`; the next micro-batch is the one that would have come next.

        Raises:
            ValueError: the state was saved with another layout (stream, DP rank/size, workers,
                seed, shard count or micro-batch size), which would not resume exactly.
        """
        saved = {k: state.get(k) for k in self._layout()}
        if state.get("format") != STATE_FORMAT or saved != self._layout():
            raise ValueError(f"data state does not match this loader: saved {saved}, "
                             f"loader {self._layout()}")
        self._positions = [Position(**p) for p in state["positions"]]
        self._skipped = [dict(s) for s in state["skipped"]]
        self._next_slot = int(state["next_slot"])
        self._close_previous()

    def skipped(self) -> dict[str, int]:
        """Skipped samples and dropped images by reason, over all workers, for what was handed out."""
        total: Counter = Counter()
        for counts in self._skipped:
            total.update(counts)
        return dict(total)


def interleave(counts: dict[str, int]) -> list[str]:
    """Spread n_s micro-batches of each stream evenly over a step: {"laion": 2, "mmc4": 1} ->
    ["laion", "mmc4", "laion"]; ties keep stream order."""
    slots = [((i + 0.5) / n, k, name) for k, (name, n) in enumerate(counts.items())
             for i in range(n)]
    return [name for _, _, name in sorted(slots)]


class TrainLoader:
    """Per optimizer step, the micro-batches of every enabled stream in the configured ratio.

    Args:
        streams: name -> StreamLoader.
        per_step: name -> micro-batches of that stream per step on this rank.
    """

    def __init__(self, streams: dict[str, StreamLoader], per_step: dict[str, int]) -> None:
        self.streams = streams
        self.per_step = per_step
        self.order = interleave(per_step)

    def __iter__(self) -> Iterator[list[dict]]:
        """One list of micro-batches per optimizer step, forever, from the current state."""
        iterators = {name: iter(loader) for name, loader in self.streams.items()}
        while True:
            yield [next(iterators[name]) for name in self.order]

    def state_dict(self) -> dict:
        """{stream name: StreamLoader.state_dict()} (plain data, for the checkpoint)."""
        return {name: loader.state_dict() for name, loader in self.streams.items()}

    def load_state_dict(self, state: dict) -> None:
        """Resume every stream; raises ValueError if a stream's saved layout differs."""
        for name, loader in self.streams.items():
            loader.load_state_dict(state[name])

    def skipped(self) -> dict[str, dict[str, int]]:
        """{stream name: {reason: count}} for everything handed out so far."""
        return {name: loader.skipped() for name, loader in self.streams.items()}


# ----------------------------------------------------------------------------- building


def micro_batches_per_step(stream: StreamConfig, name: str, dp_size: int) -> tuple[int, int]:
    """(micro-batch size, micro-batches per step) of one stream on one DP rank.

    Raises:
        ConfigError: batch_size is not a multiple of dp_size x micro_batch_size.
    """
    if stream.batch_size % dp_size:
        raise ConfigError(f"data.{name}.batch_size={stream.batch_size} is not divisible by "
                          f"the data-parallel size {dp_size}")
    per_rank = stream.batch_size // dp_size
    micro = stream.micro_batch_size or per_rank
    if micro < 1 or per_rank % micro:
        raise ConfigError(f"data.{name}: {per_rank} samples per rank per step is not a multiple "
                          f"of micro_batch_size={micro}")
    return micro, per_rank // micro


def build_stream_loader(cfg: Config, name: str, tokenizer, dp_rank: int, dp_size: int,
                        state: Optional[dict] = None,
                        transform: Optional[ImageTransform] = None) -> StreamLoader:
    """The loader of one stream ("laion" or "mmc4") for DP rank `dp_rank` of `dp_size`.

    Args:
        cfg: the run config (data section, and model.vision for the image size).
        name: "laion" or "mmc4".
        tokenizer: HF tokenizer with the Flamingo tokens added.
        dp_rank, dp_size: this replica's data-parallel coordinate (not the global rank).
        state: a saved `state_dict()` to resume from.
        transform: the image transform (default: built from the config).
    Returns:
        The loader.
    Raises:
        ShardNotFoundError: the stream's shards match no file.
        ConfigError: the stream is off, or batch sizes do not divide.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
    stream: StreamConfig = getattr(cfg.data, name)
    if not stream.shards:
        raise ConfigError(f"data.{name}.shards is not set")
    shards = tuple(expand_shards(stream.shards))
    micro, _ = micro_batches_per_step(stream, name, dp_size)
    workers = cfg.data.workers
    plan = StreamPlan(shards=shards, num_readers=dp_size * max(1, workers), seed=cfg.data.seed,
                      stream=name, resampled=stream.resampled, shuffle_block=stream.shuffle_buffer)
    spec = StreamSpec(name=name, plan=plan, dp_rank=dp_rank, dp_size=dp_size, num_workers=workers,
                      micro_batch_size=micro, seq_len=stream.seq_len,
                      max_num_media=stream.max_num_media, loss_weight=stream.loss_multiplier,
                      mmc4=cfg.data.mmc4_options)
    source = SampleSource(spec, tokenizer, transform or build_image_transform(cfg))
    return StreamLoader(source, state)


def build_train_loader(cfg: Config, tokenizer, dp_rank: int, dp_size: int,
                       state: Optional[dict] = None) -> TrainLoader:
    """The training loader of one DP rank: every stream with shards set, mixed per step.

    Args:
        cfg: the run config.
        tokenizer: HF tokenizer with the Flamingo tokens added.
        dp_rank, dp_size: this replica's data-parallel coordinate; TP/PP peers pass the same.
        state: a saved `TrainLoader.state_dict()`.
    Returns:
        The loader; iterating it yields one list of micro-batches per optimizer step.
    Raises:
        ConfigError: no stream has shards, or batch sizes do not divide.
        ShardNotFoundError: a stream's shards match no file.
    """
    names = [n for n in STREAMS if getattr(cfg.data, n).shards]
    if not names:
        raise ConfigError("data: set data.laion.shards and/or data.mmc4.shards")
    transform = build_image_transform(cfg)
    streams, per_step = {}, {}
    for name in names:
        streams[name] = build_stream_loader(cfg, name, tokenizer, dp_rank, dp_size,
                                            (state or {}).get(name), transform)
        per_step[name] = micro_batches_per_step(getattr(cfg.data, name), name, dp_size)[1]
    return TrainLoader(streams, per_step)
