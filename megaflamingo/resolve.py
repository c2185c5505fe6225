"""A loaded config, resolved once at the start of a run: what files say is filled in, the layout checked.

    cfg = load_config("configs/tiny.yaml")             # the YAML, validated field by field
    cfg, dims = resolve_config(cfg, world_size=8)      # LM sizes, token ids, the 3D layout

After `resolve_config` nothing needs `model.lm.hf_path`'s config.json or `model.tokenizer` again to
learn a size or an id: `model.lm` holds the checkpoint's sizes and `model.vocab_size` /
`*_token_id` the tokenizer's (`build_model` reads no tokenizer). `check_layout` is the one function that says whether a layout fits
a world, a model and the data streams; every entry point (training, benchmarks, the launcher's
exit-2 path) goes through it.
"""

from __future__ import annotations

import dataclasses

from megaflamingo.config import Config, ConfigError, LMConfig, ModelConfig
from megaflamingo.parallel.topology import ParallelDims

TOKEN_ID_FIELDS = ("media_token_id", "eoc_token_id", "pad_token_id")


# ----------------------------------------------------------------------------- model


def resolve_lm(lm: LMConfig) -> LMConfig:
    """The LM sizes: the checkpoint's config.json when `hf_path` is set, else the inline ones.

    Raises:
        ConfigError: a family not in the family table, a checkpoint without config.json or with
            an unsupported model_type / option.
    """
    from megaflamingo.models.families import family_of
    from megaflamingo.models.hf_weights import lm_config_from_hf

    try:
        resolved = lm_config_from_hf(lm.hf_path) if lm.hf_path is not None else lm
        family_of(resolved)
    except (OSError, ValueError) as err:
        where = "model.lm.hf_path" if lm.hf_path is not None else "model.lm.family"
        raise ConfigError(f"{where}: {err}") from None
    return resolved


def _tokenizer_ids(m: ModelConfig) -> dict[str, int]:
    """vocab_size and the Flamingo token ids the tokenizer gives (raises on a conflicting config)."""
    from megaflamingo.data.tokenizer import load_tokenizer

    try:
        _, ids = load_tokenizer(m.tokenizer)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.tokenizer: cannot load {m.tokenizer} ({err})") from None
    found = {name: getattr(ids, name) for name in ("vocab_size", *TOKEN_ID_FIELDS)}
    for name, theirs in found.items():
        mine = getattr(m, name)
        if mine is not None and mine != theirs:
            raise ConfigError(f"model.{name}={mine} but the tokenizer at {m.tokenizer} gives {theirs}")
    return found


def resolve_model(m: ModelConfig) -> ModelConfig:
    """A copy of the model config with the LM sizes, vocab_size and token ids filled in.

    Args:
        m: the model section as loaded (`validate_model` already passed).
    Returns:
        The resolved section: `lm` from the checkpoint's config.json (hf_path kept), vocab_size
        and token ids from the tokenizer, or vocab_size = lm.vocab_size without one.
    Raises:
        ConfigError: an unreadable checkpoint config or tokenizer, ids that disagree with the
            tokenizer, a missing media/eoc id, or an id outside the vocabulary.
    """
    m = dataclasses.replace(m, lm=resolve_lm(m.lm))
    if m.tokenizer is not None:
        m = dataclasses.replace(m, **_tokenizer_ids(m))
    else:
        m = dataclasses.replace(m, vocab_size=m.vocab_size or m.lm.vocab_size)
    for name in ("media_token_id", "eoc_token_id"):
        if getattr(m, name) is None:
            raise ConfigError(f"model.{name} must be set when model.tokenizer is not given")
    for name in TOKEN_ID_FIELDS:
        value = getattr(m, name)
        if value is not None and not 0 <= value < m.vocab_size:
            raise ConfigError(f"model.{name}={value} is outside the vocabulary (vocab_size {m.vocab_size})")
    return m


def is_resolved(m: ModelConfig) -> bool:
    """True when `build_model` can build from `m` without reading a tokenizer or a config.json."""
    return m.vocab_size is not None and m.media_token_id is not None and m.eoc_token_id is not None


# ----------------------------------------------------------------------------- layout


def batch_layout(global_batch: int, dims: ParallelDims, micro_batch_size: int | None = None) -> tuple[int, int]:
    """(micro-batch size per rank, gradient-accumulation steps) for a global batch on a layout.

    Default micro-batch: the whole per-rank share without pipeline stages; with pp stages the
    largest divisor of the share that still gives >= pp micro-batches (keeps the pipeline busy).

    Raises:
        ConfigError: dp does not divide the global batch, or the micro-batch does not divide the
            per-rank share.
    """
    if global_batch % dims.dp:
        raise ConfigError(f"global batch {global_batch} is not divisible by dp={dims.dp}")
    share = global_batch // dims.dp
    if micro_batch_size is None:
        fits = [d for d in range(1, share + 1) if share % d == 0 and share // d >= min(dims.pp, share)]
        micro_batch_size = max(fits) if dims.pp > 1 else share
    if micro_batch_size < 1 or share % micro_batch_size:
        raise ConfigError(f"micro batch {micro_batch_size} does not divide the per-rank share {share} "
                          f"(global batch {global_batch} over dp={dims.dp})")
    return micro_batch_size, share // micro_batch_size


def _check_engine_options(cfg: Config) -> None:
    p = cfg.parallel
    if p.tp < 1 or p.pp < 1:
        raise ConfigError("parallel.tp and parallel.pp must be >= 1")
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage must be 0-3, got {p.zero_stage}")
    if p.pp > 1 and p.zero_stage > 1:
        raise ConfigError(f"parallel: pipeline parallelism (pp={p.pp}) supports ZeRO stage 0 or 1 only, "
                          f"got zero_stage={p.zero_stage}")


def _check_model_fits(cfg: Config) -> None:
    p, lm = cfg.parallel, cfg.model.lm
    kv = lm.num_kv_heads or lm.num_heads
    for what, count in (("model.lm.num_heads", lm.num_heads), ("model.lm.num_kv_heads", kv),
                        ("model.xattn.heads", cfg.model.xattn.heads)):
        if count % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} does not divide {what}={count}")
    if lm.num_layers < p.pp:
        raise ConfigError(f"parallel.pp={p.pp} is more than model.lm.num_layers={lm.num_layers}")


def _check_streams_fit(cfg: Config, dims: ParallelDims) -> None:
    for name in ("laion", "mmc4"):
        stream = getattr(cfg.data, name)
        if stream.shards is None:
            continue
        try:
            batch_layout(stream.batch_size, dims, stream.micro_batch_size)
        except ConfigError as err:
            raise ConfigError(f"data.{name}: {err}") from None


def check_layout(cfg: Config, world_size: int) -> ParallelDims:
    """Every rule of the parallel layout, checked before any process group starts.

    Args:
        cfg: the config, resolved or not: with `model.lm.hf_path` set the LM sizes are the
            checkpoint's config.json (a small read, repeated here so that any caller gets them).
        world_size: ranks of the job.
    Returns:
        The layout (dp = world_size / (tp * pp)).
    Raises:
        ConfigError: bad tp/pp/ZeRO values, ZeRO-2/3 with pipeline stages, tp*pp not dividing the
            world, heads / kv-heads / cross-attention heads not divisible by tp, fewer layers
            than stages, or an enabled stream's batch that does not divide over dp.
    """
    _check_engine_options(cfg)
    if cfg.model.lm.hf_path is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lm=resolve_lm(cfg.model.lm)))
    dims = ParallelDims.from_world(world_size, cfg.parallel.tp, cfg.parallel.pp)
    _check_model_fits(cfg)
    _check_streams_fit(cfg, dims)
    return dims


# ----------------------------------------------------------------------------- the whole config


def resolve_config(cfg: Config, world_size: int = 1) -> tuple[Config, ParallelDims]:
    """Resolve a loaded config for a job of `world_size` ranks.

    Args:
        cfg: what `load_config` returned.
        world_size: ranks of the job (the launcher's WORLD_SIZE).
    Returns:
        (a resolved copy of the config (see `resolve_model`), its layout).
    Raises:
        ConfigError: anything `resolve_model` or `check_layout` rejects.
    """
    cfg = dataclasses.replace(cfg, model=resolve_model(cfg.model))
    return cfg, check_layout(cfg, world_size)
