"""Materialise a Flamingo's parameters one by one from their sources, after building it on the meta
device: the one-rank build (`build_model`) and the core of the rank-local one
(`parallel.materialize.build_rank_model`, which adds the TP slices and the pipeline stage).

Shapes: V vocabulary rows (V_ck the checkpoint's), D LM width.

    model = build_model(cfg, seed)        # what models.flamingo.build_model returns

1. Every parameter is created on the meta device (`params_on_meta`; buffers stay real: they are
   small and computed in the constructors), so the model's shapes exist and nothing else.
2. Each parameter a rank holds is materialised at its local shape (pieces `spans` of the full
   tensor; none: all of it), on the CPU:
   - frozen LM weights: exactly the local slice, read from the HF checkpoint (`models.hf_slices`),
     in `frozen_dtype`; vocabulary rows past V_ck (added tokens) are the mean of the checkpoint's
     rows, as `hf_weights.resize_rows` makes them (a TP rank sums its own rows, `Sources.reduce`
     adds the peers');
   - the vision tower: its open_clip checkpoint memory-mapped (`torch.load(mmap=True)`), only the
     tensors held copied; a timm tower with a weights file is built as it is (its batch-norm
     statistics are buffers); random (by name) without a file;
   - trainable weights (and the frozen ones of an inline LM): `named_init`, from (seed, parameter
     name) alone, row by row, so every layout starts from the same values and a rank draws only
     its rows; the trainable added token rows of a checkpoint LM copy the resized embedding's rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import zlib
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn

from megaflamingo.config import ModelConfig
from megaflamingo.models.flamingo import Flamingo

Spans = list[tuple[int, int, int]]
"""Pieces (dim, start, end) of a full tensor, concatenated along dim in order; empty: all of it."""


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Every nn.Parameter created or registered inside lives on the meta device (buffers do not).

    A module's own `Parameter(torch.empty(...))` becomes a meta parameter as it is created (the
    empty tensor's pages are never touched), so no parameter of the full model ever holds values.
    """
    register, new = nn.Module.register_parameter, nn.Parameter.__dict__["__new__"]

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    def new_on_meta(cls, data: torch.Tensor | None = None, requires_grad: bool = True) -> nn.Parameter:
        if data is not None and data.device.type != "meta":
            data = data.detach().to("meta")
        return new.__func__(cls, data, requires_grad)

    nn.Module.register_parameter, nn.Parameter.__new__ = on_meta, staticmethod(new_on_meta)
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Parameter.__new__ = register, new


def _row_generator(seed: int, name: str, row: int) -> torch.Generator:
    base = (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**61
    return torch.Generator().manual_seed((base * 1_000_033 + row) % 2**63)


def local_shape(full_shape: tuple[int, ...], spans: list[tuple[int, int, int]]) -> tuple[int, ...]:
    """The shape of the pieces `spans` of a tensor of `full_shape` (the full shape when empty)."""
    if not spans:
        return tuple(full_shape)
    shape = list(full_shape)
    shape[spans[0][0]] = sum(b - a for _, a, b in spans)
    return tuple(shape)


def named_init(cfg: ModelConfig, name: str, shape: tuple[int, ...], seed: int,
               spans: list[tuple[int, int, int]] | None = None) -> torch.Tensor:
    """The fp32 initial value of parameter `name` (full shape `shape`), or only its pieces `spans`.

    Drawn from (seed, name) alone, whatever the layout: row r (index r of dim 0) of a tensor of two
    or more dims comes from its own generator, seeded by (seed, name, r), so a rank draws exactly
    the rows it holds (a column shard draws each row and keeps its columns: one row at a time).
    Rules: gates model.xattn.gate_init; latents N(0, latent_init_std^2); other 1-dim tensors 1
    (`weight`) or 0; an inline LM's matrices N(0, 0.02^2); the rest U(+-1/sqrt(fan_in)) (nn.Linear
    and conv's default bound).
    """
    spans = spans or []
    out_shape, leaf = local_shape(shape, spans), name.rsplit(".", 1)[-1]
    if leaf in ("attn_gate", "ff_gate"):
        return torch.full(out_shape, float(getattr(cfg.xattn, "gate_init", 0.0)))
    if len(shape) <= 1 and leaf != "latents":
        return torch.ones(out_shape) if leaf == "weight" else torch.zeros(out_shape)
    if leaf == "latents":
        scale, normal = getattr(cfg.perceiver, "latent_init_std", 1.0), True
    elif name.startswith("lm."):  # an inline (random) LM: DecoderLM's std-0.02 start
        scale, normal = 0.02, True
    else:
        scale, normal = 1.0 / math.sqrt(math.prod(shape[1:])), False
    rows = [r for _, a, b in spans for r in range(a, b)] if spans and spans[0][0] == 0 else range(shape[0])
    cols = spans[0][1:] if spans and spans[0][0] == 1 else None
    out = torch.empty(out_shape)
    for i, r in enumerate(rows):
        gen, row = _row_generator(seed, name, r), torch.empty(shape[1:])
        row = row.normal_(0.0, scale, generator=gen) if normal else row.uniform_(-scale, scale, generator=gen)
        out[i] = row if cols is None else row[cols[0]:cols[1]]
    return out


# ----------------------------------------------------------------------------- sources


def vision_state(path: str | None) -> dict[str, torch.Tensor] | None:
    """The tower's checkpoint, memory-mapped: tensors are read only when copied."""
    if path is None:
        return None
    state = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    state = {k.removeprefix("module."): v for k, v in state.get("state_dict", state).items()}
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return state


@dataclasses.dataclass
class Sources:
    """Where parameter values come from."""

    cfg: ModelConfig
    reader: object | None
    """The LM checkpoint (`models.hf_slices.SliceReader` / `StateReader`), None for an inline LM."""
    lm_cfg: object
    vocab_ck: int
    vision: dict[str, torch.Tensor] | None
    seed: int
    frozen_dtype: torch.dtype
    reduce: Callable[[torch.Tensor], None] | None = None
    """Sums a tensor in place over the ranks holding the other vocabulary rows (TP), or None."""
    means: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


def _mean_row(src: Sources, ours: str, read: torch.Tensor | None) -> torch.Tensor:
    """The mean of all V_ck checkpoint rows of `ours` (with `src.reduce`, collective: each rank sums
    its rows)."""
    if ours not in src.means:
        total = read.double().sum(dim=0) if read is not None else torch.zeros(src.lm_cfg.hidden_size,
                                                                             dtype=torch.float64)
        if src.reduce is not None:  # the ranks' row shards together are all V_ck checkpoint rows
            src.reduce(total)
        src.means[ours] = (total / src.vocab_ck).float()
    return src.means[ours]


def _vocab_rows(src: Sources, ours: str, span: tuple[int, int]) -> torch.Tensor:
    """Rows [a, b) of the resized (V, D) table `ours`: checkpoint rows, then mean rows past V_ck."""
    from megaflamingo.models.hf_slices import lm_slice

    a, b = span
    read = lm_slice(src.reader, src.lm_cfg, ours, (a, min(b, src.vocab_ck))) if a < src.vocab_ck else None
    if src.cfg.vocab_size <= src.vocab_ck:
        return read
    mean = _mean_row(src, ours, read)  # every TP rank takes part, whatever its rows
    extra = mean.expand(max(0, b - max(a, src.vocab_ck)), -1)
    return extra.clone() if read is None else torch.cat([read.float(), extra]).to(read.dtype)


def _lm_frozen(src: Sources, ours: str, spans: list[tuple[int, int, int]]) -> torch.Tensor:
    from megaflamingo.models.hf_slices import lm_slice

    if ours in ("embed_tokens.weight", "lm_head.weight"):
        rows = (spans[0][1], spans[0][2]) if spans else (0, src.cfg.vocab_size)
        return _vocab_rows(src, ours, rows)
    if not spans:
        return lm_slice(src.reader, src.lm_cfg, ours)
    dim, a, b = spans[0]
    return lm_slice(src.reader, src.lm_cfg, ours, rows=(a, b) if dim == 0 else None, cols=(a, b) if dim == 1 else None)


def _added_rows(src: Sources, ids: list[int]) -> torch.Tensor:
    """The trainable added rows: the resized embedding's rows of their ids (the embedding table of
    this rank was materialised first, so the mean row is known)."""
    from megaflamingo.models.hf_slices import lm_slice

    rows = [lm_slice(src.reader, src.lm_cfg, "embed_tokens.weight", (i, i + 1)).float() if i < src.vocab_ck
            else src.means["embed_tokens.weight"][None] for i in ids]
    return torch.cat(rows) if rows else torch.zeros(0, src.lm_cfg.hidden_size)


def value_of(src: Sources, name: str, param: nn.Parameter, full_shape: tuple[int, ...],
           spans: list[tuple[int, int, int]], ids: list[int]) -> torch.Tensor:
    """This rank's value of parameter `name` (local shape), from the checkpoint or the seeded init."""
    if name == "lm.embed_tokens.added" and src.reader is not None:
        return _added_rows(src, ids)
    if name.startswith("lm.") and src.reader is not None and not param.requires_grad:
        return _lm_frozen(src, name[len("lm."):], spans).to(src.frozen_dtype)
    if name.startswith("vision.") and src.vision is not None:
        key = name[len("vision."):].removeprefix("visual.")
        if key not in src.vision:
            raise ValueError(f"{src.cfg.vision.weights}: no tensor '{key}' for the vision tower's {name}")
        return src.vision[key].to(src.frozen_dtype).clone()
    value = named_init(src.cfg, name, full_shape, src.seed, spans)
    return value if param.requires_grad else value.to(src.frozen_dtype)


# ----------------------------------------------------------------------------- the build


def lm_source(cfg: ModelConfig, ranks: int) -> tuple[object, object, int]:
    """(LM config with the checkpoint's sizes, its reader, checkpoint vocabulary rows).

    The reader slices safetensors lazily (`SliceReader`); a one-rank build (`ranks` == 1) of a
    checkpoint that cannot be sliced (pytorch_model*.bin) reads it whole once (`StateReader`).
    """
    from megaflamingo.models.families import family_of
    from megaflamingo.models.hf_slices import SliceReader, StateReader, sliceable
    from megaflamingo.models.hf_weights import lm_config_from_hf

    if cfg.lm.hf_path is None:
        return cfg.lm, None, cfg.vocab_size
    lm_cfg = lm_config_from_hf(cfg.lm.hf_path)
    reader = SliceReader(cfg.lm.hf_path) if ranks > 1 or sliceable(cfg.lm.hf_path) else StateReader(cfg.lm.hf_path)
    family = family_of(lm_cfg)
    if family.hf_mlp_width_key is not None and family.hf_mlp_width_key in reader.names():
        lm_cfg.intermediate_size = reader.shape(family.hf_mlp_width_key)[0]
    lm_cfg.vocab_size = reader.shape(f"{family.hf_module('embed_tokens')}.weight")[0]
    return lm_cfg, reader, lm_cfg.vocab_size


FROZEN_DTYPES = {None: torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16}
"""model.frozen_dtype -> the dtype frozen weights are materialised in (None: fp32, the engine casts)."""


def timm_tower(cfg: ModelConfig, frozen_dtype: torch.dtype) -> nn.Module:
    """A timm tower with its local weights file, built as it is (a few MiB, stage 0 only): its
    batch-norm statistics are buffers, and the file's names may differ from timm's
    (`towers.load_by_name_or_order`)."""
    from megaflamingo.models.towers import TimmTower

    return TimmTower(cfg.vision).to(frozen_dtype)


def materialise(model: nn.Module, src: Sources, full: dict[str, tuple[int, ...]], held: Callable[[str], bool],
                spans_of: Callable[[str], Spans] = lambda name: []) -> list[tuple[str, nn.Parameter]]:
    """Replace every meta parameter that `held` names by its value at its local shape, in place.

    Args:
        model: the model built under `params_on_meta` (TP modules swapped in, if any).
        src: where values come from.
        full: the full shape of every parameter, by name.
        held: whether this rank holds parameter `name`.
        spans_of: the pieces of parameter `name` this rank holds (empty: all).
    Returns:
        (name, new parameter) of each one materialised, in order.
    Raises:
        ValueError: a value whose shape is not the parameter's (one line naming it).
    """
    ids = sorted({src.cfg.media_token_id, src.cfg.eoc_token_id}) if not src.cfg.freeze_lm_embeddings else []
    made = []
    for name, param in list(model.named_parameters()):
        if param.device.type != "meta" or not held(name):
            continue
        value = value_of(src, name, param, full[name], spans_of(name), ids)
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{name}: materialised {tuple(value.shape)}, the rank holds {tuple(param.shape)}")
        owner, leaf = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
        new = nn.Parameter(value.contiguous(), requires_grad=param.requires_grad)
        new.__dict__.update(param.__dict__)  # TP tags (model_parallel, ...) carry over
        owner._parameters[leaf] = new
        made.append((name, new))
    return made


def _meta_tower(cfg: ModelConfig) -> nn.Module | None:
    """The open_clip tower built wholly on the meta device: open_clip computes some initial values
    itself (`scale * torch.randn(...)`), which would otherwise be written at full size first; it
    has no buffers. None for a timm tower (its batch-norm statistics are real buffers)."""
    from megaflamingo.models.towers import build_tower

    if cfg.vision.kind != "open_clip":
        return None
    with torch.device("meta"):
        return build_tower(cfg.vision)


def start_build(cfg: ModelConfig, ranks: int, frozen_dtype: torch.dtype | None, seed: int,
                held_vision: bool) -> tuple[Flamingo, Sources]:
    """The model on the meta device and the sources of its values (steps 1 and 2's inputs).

    Args:
        cfg: the resolved model config.
        ranks: how many ranks share the model (a multi-rank build needs a sliceable checkpoint).
        frozen_dtype: dtype of the frozen weights; None: `cfg.frozen_dtype`.
        seed: the initialisation seed.
        held_vision: this rank holds the vision tower (a timm tower with a weights file is built
            here, for real).
    """
    from megaflamingo.models.flamingo import construct_model, resolve_token_ids

    cfg = resolve_token_ids(cfg)
    frozen_dtype = frozen_dtype or FROZEN_DTYPES[cfg.frozen_dtype]
    lm_cfg, reader, vocab_ck = lm_source(cfg, ranks)
    plain = dataclasses.replace(cfg, lm=dataclasses.replace(lm_cfg, hf_path=None),
                                vision=dataclasses.replace(cfg.vision, weights=None))
    with params_on_meta():
        model = construct_model(plain, _meta_tower(plain))
    model.lm.cfg.hf_path = cfg.lm.hf_path
    timm = cfg.vision.kind == "timm" and cfg.vision.weights is not None
    if timm and held_vision:
        model.vision = timm_tower(cfg, frozen_dtype)
    vision = None if timm else vision_state(cfg.vision.weights)
    return model, Sources(cfg, reader, lm_cfg, vocab_ck, vision, seed, frozen_dtype)


def build_model(cfg: ModelConfig, seed: int, frozen_dtype: torch.dtype | None = None) -> tuple[Flamingo, object]:
    """The whole model in one process, every parameter from its source (module docstring).

    Returns:
        (model, reader): the reader's `reads` list every checkpoint slice read (None: inline LM).
    Raises:
        FileNotFoundError / ValueError: a missing or truncated weight file (one line naming it).
    """
    model, src = start_build(cfg, 1, frozen_dtype, seed, held_vision=True)
    materialise(model, src, {n: tuple(p.shape) for n, p in model.named_parameters()}, held=lambda name: True)
    return model, src.reader
