"""The training data streams as one table: name -> preprocessing, options, batch rules, loss multiplier.

    for name in enabled_streams(cfg):        # the streams with shards, in table order
        section = stream_config(cfg, name)   # data.<name>: shards, batch sizes, shapes, multiplier
        sample = STREAMS[name].preprocess(fields, context, rng, notes)

Nothing outside this module names a stream: loaders, engines and the trainer iterate over
`STREAMS` (or `enabled_streams`). A stream's name is also its config section `data.<name>`
(`data.laion.*`, `data.mmc4.*` are user contracts); a kind may name one more section holding its
preprocessing options (`data.mmc4_options`).

Batch rules, the same for every stream: `batch_size` samples per optimizer step (global), fixed
shapes per micro-batch (`seq_len` tokens, `max_num_media` images, zero-padded), micro-batches of
`micro_batch_size` samples per DP rank, and the stream's `loss_multiplier` carried per sample as
`loss_weight` (the step objective is sum_s multiplier_s * mean loss_s, OpenFlamingo's).
Adding a stream = one preprocessing function, one `StreamKind` entry, one `StreamConfig` section.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Optional

from megaflamingo.config import Config, ConfigError, StreamConfig
from megaflamingo.data.batching import Sample, TextEncoder
from megaflamingo.data.easyvqa import answer_only_labels
from megaflamingo.data.laion import laion_text, preprocess_laion, read_caption
from megaflamingo.data.mmc4 import preprocess_mmc4
from megaflamingo.data.tokenizer import FlamingoTokens


@dataclass(frozen=True)
class PreprocessContext:
    """What a stream's preprocessing needs besides the raw sample (one per stream and worker)."""

    encoder: TextEncoder
    """Fixed-length tokeniser at the stream's seq_len."""
    tokens: FlamingoTokens
    eos_token: Optional[str]
    max_num_media: int
    options: Any = None
    """The kind's options section (e.g. `MMC4Options`), or None."""
    answer_only: bool = False
    """`data.<stream>.answer_only_loss`: VQA-format pairs take the loss on the answer only."""


Preprocess = Callable[[dict, PreprocessContext, random.Random, Counter], Sample]
"""(raw fields, context, the sample's own RNG, dropped-image counter) -> Sample; raises SkipSample."""


@dataclass(frozen=True)
class StreamKind:
    """One entry of the stream table."""

    name: str
    """Also the config section `data.<name>` (a `StreamConfig`)."""
    preprocess: Preprocess
    options_section: Optional[str] = None
    """Name of an extra `data.*` section passed to `preprocess` as `context.options`."""
    summary: str = ""


def _laion(fields: dict, ctx: PreprocessContext, rng: random.Random, notes: Counter) -> Sample:
    sample = preprocess_laion(fields, ctx.encoder, ctx.tokens, ctx.eos_token, rng)
    if ctx.answer_only:
        text = laion_text(read_caption(fields), ctx.eos_token)
        sample.labels = answer_only_labels(sample.labels, text, ctx.encoder)
    return sample


def _mmc4(fields: dict, ctx: PreprocessContext, rng: random.Random, notes: Counter) -> Sample:
    return preprocess_mmc4(fields, ctx.encoder, ctx.tokens, ctx.eos_token, ctx.options,
                           ctx.max_num_media, rng, notes)


STREAMS: dict[str, StreamKind] = {kind.name: kind for kind in (
    StreamKind("laion", _laion, summary="image-text pairs (img2dataset shards), laion.py"),
    StreamKind("mmc4", _mmc4, options_section="mmc4_options",
               summary="interleaved documents (OpenFlamingo's MMC4 json), mmc4.py"),
)}
"""Stream name -> kind, in the order streams are listed, mixed and logged."""


def stream_kind(name: str) -> StreamKind:
    """The table entry of `name`. Raises ConfigError for an unknown stream."""
    if name not in STREAMS:
        raise ConfigError(f"data: unknown stream '{name}' (known: {', '.join(STREAMS)})")
    return STREAMS[name]


def stream_config(cfg: Config, name: str) -> StreamConfig:
    """The config section `data.<name>` of a stream."""
    return getattr(cfg.data, stream_kind(name).name)


def stream_options(cfg: Config, name: str) -> Any:
    """The kind's options section (`data.<options_section>`), or None."""
    section = stream_kind(name).options_section
    return getattr(cfg.data, section) if section else None


def enabled_streams(cfg: Config) -> list[str]:
    """Names of the streams whose `shards` are set, in table order (may be empty)."""
    return [name for name in STREAMS if stream_config(cfg, name).shards]


def require_streams(cfg: Config) -> list[str]:
    """`enabled_streams`, or a ConfigError naming the keys to set when there is none."""
    names = enabled_streams(cfg)
    if not names:
        keys = " and/or ".join(f"data.{name}.shards" for name in STREAMS)
        raise ConfigError(f"data: no stream has shards; set {keys}")
    return names


def loss_multipliers(cfg: Config) -> dict[str, float]:
    """{name: loss multiplier} of the enabled streams (the weights of the step objective)."""
    return {name: stream_config(cfg, name).loss_multiplier for name in enabled_streams(cfg)}


def global_batch_sizes(cfg: Config) -> dict[str, int]:
    """{name: samples per optimizer step} of the enabled streams."""
    return {name: stream_config(cfg, name).batch_size for name in enabled_streams(cfg)}


def largest_shapes(cfg: Config) -> tuple[int, int]:
    """(seq_len, max_num_media) of the enabled stream with the most tokens x images per sample;
    over every stream of the table when none is enabled (e.g. for a FLOPs estimate)."""
    sections = [stream_config(cfg, n) for n in (enabled_streams(cfg) or list(STREAMS))]
    widest = max(sections, key=lambda s: s.seq_len * max(1, s.max_num_media))
    return widest.seq_len, widest.max_num_media
