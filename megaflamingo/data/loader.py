"""Training data loaders: one rank's slice of every global batch of a stream (`StreamLoader`), and
the per-step mix of the streams (`TrainLoader`).

    loader = build_train_loader(cfg, tokenizer, dp_rank, dp_size)
    for step_batches in loader:          # one optimizer step: a list of micro-batch dicts
        ...
    state = loader.state_dict()          # this rank's readers; merge_states(all ranks) = global
    loader = build_train_loader(cfg, tokenizer, dp_rank, dp_size, state=state)  # exact resume
    loader.skipped()                     # {"laion": {"bad_image": 3, ...}, "mmc4": {...}}

Which samples form a step does not depend on dp or the worker count (dealing.py): C canonical
readers deal each global batch, a DP rank reads only the readers of its slice, its DataLoader
workers split those readers into consecutive runs. Each worker yields, per step, the chunks
(batch_size / C samples) of its readers collated into one batch, with each reader's position
after its chunk; the images go straight into the step's slot of a shared-memory ring (ring.py), so
the main process hands out a step without copying it; torch's DataLoader
returns worker items strictly round-robin, so the main process assembles a step from one item of
each worker and knows every reader's position for everything it has handed out. The state is
those positions (and skip counts), one per reader, so it resumes on any layout. Streams are
infinite (epoch after epoch).

Deliberate differences from OpenFlamingo's loaders (reference §4.1, §4.7.9), for determinism and
exact resume: the shard order of an epoch comes from (seed, epoch) instead of a seeded 2000-shard
buffer; samples are shuffled in seeded blocks of `shuffle_buffer` inside a shard instead of
webdataset's 5000-sample buffer seeded from pid and time; flips and keep coins come from a
per-sample RNG; an epoch is a full pass over the shards instead of `train_num_samples` (the
training loop counts steps); fewer shards than readers splits shards by sample index instead of
asserting; bad samples are counted by reason instead of logged and forgotten.
"""

from __future__ import annotations

import itertools
import random
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megaflamingo.config import Config, ConfigError, StreamConfig
from megaflamingo.data.batching import Sample, SkipSample, TextEncoder, collate
from megaflamingo.data.dealing import (STATE_FORMAT, canonical_count, rank_readers,
                                       worker_readers)
from megaflamingo.data.images import ImageTransform, build_image_transform
from megaflamingo.data.ring import StepRing, ring_supported
from megaflamingo.data.sharding import MAX_EMPTY_EPOCHS, Position, StreamPlan, iter_reader
from megaflamingo.data.shards import expand_shards
from megaflamingo.data.streams import (PreprocessContext, global_batch_sizes, require_streams,
                                       stream_config, stream_kind, stream_options)
from megaflamingo.data.tokenizer import flamingo_token_ids

PREFETCH = 2
"""Steps each DataLoader worker prepares ahead; the ring holds PREFETCH + 3 steps (the one being
assembled, the previous one the consumer may still hold, one spare)."""


@dataclass
class StreamSpec:
    """Everything a worker needs to produce one stream's chunks (picklable)."""

    name: str
    plan: StreamPlan
    """The reading plan over the C canonical readers."""
    chunk_size: int
    """Samples each reader adds to each global batch: batch_size / C."""
    seq_len: int
    max_num_media: int
    loss_weight: float
    options: Any = None
    answer_only: bool = False


class SampleSource:
    """Preprocesses raw samples of one stream (its kind's function from the stream table)."""

    def __init__(self, spec: StreamSpec, tokenizer, transform: ImageTransform) -> None:
        self.spec = spec
        self.preprocess_fn = stream_kind(spec.name).preprocess
        self.context = PreprocessContext(TextEncoder(tokenizer, spec.seq_len),
                                         flamingo_token_ids(tokenizer), tokenizer.eos_token,
                                         spec.max_num_media, spec.options, spec.answer_only)
        self.transform = transform

    def preprocess(self, fields: dict, rng: random.Random, notes: Counter) -> Sample:
        """Raw fields -> Sample, or raise SkipSample; images dropped inside go to `notes`."""
        return self.preprocess_fn(fields, self.context, rng, notes)

    def chunks(self, reader: int, position: Position,
               skipped: dict) -> Iterator[tuple[list, Position, dict, list]]:
        """Yield (the reader's next `chunk_size` samples, position after, cumulative skip counts,
        sample keys) of one reader, forever: its share of each global batch."""
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
            if len(batch) == self.spec.chunk_size:
                yield batch, after, dict(counts), keys
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
    """What each DataLoader worker runs: per step, its (consecutive) readers' chunks, collated
    into one batch (images into the step's ring slot when it is free), with each reader's
    position after it."""

    def __init__(self, source: SampleSource, groups: list[list[int]], positions: dict,
                 skipped: dict, ring: Optional[StepRing] = None) -> None:
        self.source, self.groups, self.positions, self.skipped = source, groups, positions, skipped
        self.ring = ring

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        readers = self.groups[worker]
        streams = [self.source.chunks(v, self.positions[v], self.skipped[v]) for v in readers]
        spec, transform = self.source.spec, self.source.transform
        for step in itertools.count():
            samples, states, keys = [], [], []
            for reader, stream in zip(readers, streams):
                chunk, after, counts, chunk_keys = next(stream)
                samples += chunk
                keys += chunk_keys
                states.append((reader, (after.epoch, after.unit_pos, after.sample_pos), counts))
            out = self.ring.claim(step, worker) if self.ring is not None else None
            batch = collate(samples, transform, spec.max_num_media, spec.loss_weight, out)
            yield _to_wire(batch, in_ring=out is not None), states, keys


def _as_is(item):
    return item


def _to_wire(batch: dict[str, torch.Tensor], in_ring: bool) -> dict:
    """The batch as it crosses from a worker: images as None when written into the ring, else in
    their shared-memory tensor; the small tensors as numpy arrays, pickled inline (as tensors
    each would cost a shared-memory file and a file-descriptor hand-over per step)."""
    return {k: (None if in_ring else v) if k == "images" else v.numpy() for k, v in batch.items()}


def _from_wire(batch: dict) -> dict:
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def _cut(chunks: list[dict], micro: int, images: Optional[torch.Tensor] = None) -> list[dict]:
    """Concatenate the workers' batches (in reader order) and cut the slice into micro-batches.

    Args:
        chunks: each worker's batch dict.
        micro: samples per micro-batch.
        images: the step's images already assembled (the ring), or None to concatenate them.
    """
    whole = {key: chunks[0][key] if len(chunks) == 1 else torch.cat([c[key] for c in chunks])
             for key in chunks[0] if key != "images" or images is None}
    if images is not None:
        whole["images"] = images
    count = whole["input_ids"].shape[0] // micro
    return [{k: v[i * micro:(i + 1) * micro] for k, v in whole.items()} for i in range(count)]


class StreamLoader:
    """Infinite, resumable: per step, one DP rank's micro-batches of one stream.

    Args:
        source: the stream's preprocessing (spec, tokenizer, transform).
        readers: the canonical readers this rank reads (dealing.rank_readers).
        workers: DataLoader workers (0: read in the main process).
        micro_batch_size: samples per micro-batch.
        state: a `state_dict()` (this rank's, or a merged global one) to resume from.
    """

    def __init__(self, source: SampleSource, readers: list[int], workers: int,
                 micro_batch_size: int, state: Optional[dict] = None) -> None:
        self.source = source
        self.spec = source.spec
        self.readers, self.micro_batch_size = list(readers), micro_batch_size
        self.groups = worker_readers(self.readers, workers)
        self.workers = len(self.groups) if workers else 0
        self._positions = {v: Position() for v in self.readers}
        self._skipped: dict[int, dict] = {v: {} for v in self.readers}
        self._iterator = None
        self.last_keys: list[str] = []
        """"shard#key" of each sample of the last step handed out, in slice order."""
        if state is not None:
            self.load_state_dict(state)

    def __iter__(self) -> Iterator[list[dict]]:
        """Per step, the rank's micro-batches; starting a new iteration ends the previous one."""
        self._close_previous()
        iterator = self._run()
        self._iterator = weakref.ref(iterator)  # weak: a generator <-> loader cycle delays shutdown
        return iterator

    def _close_previous(self) -> None:
        previous = self._iterator() if self._iterator is not None else None
        if previous is not None:
            previous.close()
        self._iterator = None

    def _run(self) -> Iterator[list[dict]]:
        ring = self._ring()
        dataset = _ReaderDataset(self.source, self.groups, dict(self._positions),
                                 dict(self._skipped), ring)
        items = iter(DataLoader(dataset, batch_size=None, num_workers=self.workers,
                                collate_fn=_as_is,
                                prefetch_factor=PREFETCH if self.workers else None))
        try:
            for step in itertools.count():
                if ring is not None:
                    ring.collect()
                parts = [next(items) for _ in self.groups]  # one per worker, round-robin
                for _, states, _ in parts:
                    for reader, after, counts in states:
                        self._positions[reader], self._skipped[reader] = Position(*after), counts
                self.last_keys = [key for _, _, keys in parts for key in keys]
                batches = [_from_wire(batch) for batch, _, _ in parts]
                images = None if ring is None else ring.assemble(
                    step, [batch["images"] for batch in batches])
                yield _cut(batches, self.micro_batch_size, images)
        finally:
            del items  # shuts the workers down now

    def _ring(self) -> Optional[StepRing]:
        """The workers' shared step buffers (None in-process: nothing crosses a process)."""
        if not self.workers or not ring_supported():
            return None
        height, width = self.source.transform.size
        rows = [len(group) * self.spec.chunk_size for group in self.groups]
        return StepRing(PREFETCH + 3, rows, (self.spec.max_num_media, 1, 3, height, width))

    def order_key(self) -> dict:
        """What fixes this stream's sample order; a state must match it to load."""
        plan = self.spec.plan
        return {"stream": self.spec.name, "canonical_readers": plan.num_readers, "seed": plan.seed,
                "num_shards": len(plan.shards), "chunk_size": self.spec.chunk_size,
                "resampled": plan.resampled, "shuffle_buffer": plan.shuffle_block}

    def state_dict(self) -> dict:
        """Position and skip counts of each of this rank's readers after what was handed out."""
        return {"format": STATE_FORMAT, "order": self.order_key(),
                "readers": {v: {"position": self._positions[v].to_dict(),
                                "skipped": dict(self._skipped[v])} for v in self.readers}}

    def load_state_dict(self, state: dict) -> None:
        """Resume from a state of any layout; the next step is the one that would have come next.

        Raises:
            ValueError: the state fixes another sample order (canonical readers, seed, shard
                count, batch size, shuffling) or lacks one of this rank's readers (a per-rank
                state loaded on another layout: merge every rank's state first).
        """
        if state.get("format") != STATE_FORMAT or state.get("order") != self.order_key():
            raise ValueError(f"data state of stream '{self.spec.name}' was saved for another "
                             f"sample order: saved {state.get('order')} (format "
                             f"{state.get('format')}), now {self.order_key()}")
        missing = [v for v in self.readers if v not in state["readers"]]
        if missing:
            raise ValueError(f"data state of stream '{self.spec.name}' lacks reader {missing[0]} "
                             f"(saved on another layout? merge every DP rank's state)")
        for v in self.readers:
            self._positions[v] = Position(**state["readers"][v]["position"])
            self._skipped[v] = dict(state["readers"][v]["skipped"])
        self._close_previous()

    def skipped(self) -> dict[str, int]:
        """Skipped samples and dropped images by reason, over this rank's readers."""
        total: Counter = Counter()
        for counts in self._skipped.values():
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
            steps = {name: iter(next(it)) for name, it in iterators.items()}
            yield [next(steps[name]) for name in self.order]

    def state_dict(self) -> dict:
        """{stream name: StreamLoader.state_dict()} (plain data; this rank's readers)."""
        return {name: loader.state_dict() for name, loader in self.streams.items()}

    def load_state_dict(self, state: dict) -> None:
        """Resume every stream from a state of this rank or a merged one; ValueError if the
        saved sample order differs or a reader is missing."""
        for name, loader in self.streams.items():
            if name not in state:
                raise ValueError(f"data state has no stream '{name}' (saved with streams "
                                 f"{sorted(state)})")
            loader.load_state_dict(state[name])

    def skipped(self) -> dict[str, dict[str, int]]:
        """{stream name: {reason: count}} for everything this rank handed out so far."""
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


def check_data_parallel(cfg: Config, dp_size: int) -> int:
    """The data rules of a layout, checkable before any process group starts.

    Every enabled stream's batch splits over `dp_size` (and its micro-batch size), the canonical
    reader count divides every batch size, and `dp_size` divides it.

    Returns:
        The canonical reader count C (0 when no stream is enabled).
    Raises:
        ConfigError: a rule is broken (one line naming the keys).
    """
    sizes = global_batch_sizes(cfg)
    if not sizes:
        return 0
    for name in sizes:
        micro_batches_per_step(stream_config(cfg, name), name, dp_size)
    count = canonical_count(cfg.data.canonical_readers, sizes)
    rank_readers(count, 0, dp_size)
    return count


def build_stream_loader(cfg: Config, name: str, tokenizer, dp_rank: int, dp_size: int,
                        state: Optional[dict] = None,
                        transform: Optional[ImageTransform] = None) -> StreamLoader:
    """The loader of one stream (a name of the stream table) for DP rank `dp_rank` of `dp_size`.

    Args:
        cfg: the run config (data section, and model.vision for the image size).
        name: the stream, e.g. "laion" or "mmc4".
        tokenizer: HF tokenizer with the Flamingo tokens added.
        dp_rank, dp_size: this replica's data-parallel coordinate (not the global rank).
        state: a saved `StreamLoader.state_dict()` (this rank's, or merged) to resume from.
        transform: the image transform (default: built from the config).
    Returns:
        The loader.
    Raises:
        ShardNotFoundError: the stream's shards match no file.
        ConfigError: the stream is off, or batch sizes, canonical readers and dp do not divide.
    """
    stream = stream_config(cfg, name)
    if not stream.shards:
        raise ConfigError(f"data.{name}.shards is not set")
    shards = tuple(expand_shards(stream.shards))
    micro, _ = micro_batches_per_step(stream, name, dp_size)
    count = canonical_count(cfg.data.canonical_readers, global_batch_sizes(cfg))
    readers = rank_readers(count, dp_rank, dp_size)
    plan = StreamPlan(shards=shards, num_readers=count, seed=cfg.data.seed, stream=name,
                      resampled=stream.resampled, shuffle_block=stream.shuffle_buffer)
    spec = StreamSpec(name=name, plan=plan, chunk_size=stream.batch_size // count,
                      seq_len=stream.seq_len, max_num_media=stream.max_num_media,
                      loss_weight=stream.loss_multiplier, options=stream_options(cfg, name),
                      answer_only=stream.answer_only_loss)
    source = SampleSource(spec, tokenizer, transform or build_image_transform(cfg))
    return StreamLoader(source, readers, cfg.data.workers, micro, state)


def build_train_loader(cfg: Config, tokenizer, dp_rank: int, dp_size: int,
                       state: Optional[dict] = None) -> TrainLoader:
    """The training loader of one DP rank: every stream with shards set, mixed per step.

    Args:
        cfg: the run config.
        tokenizer: HF tokenizer with the Flamingo tokens added.
        dp_rank, dp_size: this replica's data-parallel coordinate; TP/PP peers pass the same.
        state: a saved `TrainLoader.state_dict()`, or `merge_states` of every rank's.
    Returns:
        The loader; iterating it yields one list of micro-batches per optimizer step.
    Raises:
        ConfigError: no stream has shards, or batch sizes, canonical readers and dp do not divide.
        ShardNotFoundError: a stream's shards match no file.
    """
    names = require_streams(cfg)
    transform = build_image_transform(cfg)
    streams, per_step = {}, {}
    for name in names:
        streams[name] = build_stream_loader(cfg, name, tokenizer, dp_rank, dp_size, None, transform)
        per_step[name] = micro_batches_per_step(stream_config(cfg, name), name, dp_size)[1]
    loader = TrainLoader(streams, per_step)
    if state is not None:
        loader.load_state_dict(state)
    return loader
