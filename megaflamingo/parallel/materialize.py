"""Build only this rank's share of a Flamingo: meta-device construction, then its stage and TP slices.

Shapes: V vocabulary rows (V_ck the checkpoint's), D LM width.

    model = build_rank_model(cfg, groups, parts)    # parts: pipeline stage boundaries (None: all)

1. Every parameter is created on the meta device (`params_on_meta`; buffers stay real: they are
   small and computed in the constructors), so the full model's shapes exist and nothing else.
2. The tensor-parallel plan (`parallel.plan.apply_tensor_parallel`) swaps modules on the meta
   device: the parameters take their local shapes.
3. Each parameter of this rank's pipeline stage is materialised at its local shape, on the CPU:
   - frozen LM weights: exactly the local slice, read from the HF safetensors files
     (`models.hf_slices`), in `frozen_dtype`; vocabulary rows past V_ck (added tokens) are the
     mean of the checkpoint's rows, as `hf_weights.resize_rows` makes them: each TP rank sums its
     own rows and the sums are all-reduced over the TP group;
   - the vision tower: its open_clip checkpoint memory-mapped (`torch.load(mmap=True)`), only
     the tensors this rank holds copied; random (seeded by name) without a checkpoint;
   - trainable weights (and the frozen ones of an inline LM): drawn from a generator seeded by
     (seed, parameter name) at their full shape, then sliced, so every layout starts from the same
     values; initialisation rules as the modules' own (Linear: U(+-1/sqrt(fan_in)), LayerNorm: 1/0,
     gates: model.xattn.gate_init, latents: N(0, latent_init_std^2), decoder linears N(0, 0.02^2));
     the trainable added token rows copy the embedding rows of their ids.
   Parameters of other stages stay on the meta device: no rank ever holds the full model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import zlib
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from megaflamingo.config import ModelConfig
from megaflamingo.models.flamingo import Flamingo
from megaflamingo.parallel.layers import shard_bounds

_STAGE_LAYER = re.compile(r"^(?:lm\.layers|xattn)\.(\d+)\.")


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Every nn.Parameter registered inside goes to the meta device (buffers do not)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def local_spans(style: str | None, full_shape: tuple[int, ...], tp: int, rank: int) -> list[tuple[int, int, int]]:
    """Which part of a full tensor a TP rank holds: [(dim, start, end), ...] pieces, concatenated
    along `dim` in order (column_kv: the k and v halves apart). Empty: the whole tensor."""
    if style is None or tp == 1 or not full_shape:
        return []
    if style in ("column", "vocab", "column_kv"):
        parts = 2 if style == "column_kv" else 1
        size = full_shape[0] // parts
        return [(0, p * size + a, p * size + b) for p in range(parts) for a, b in [shard_bounds(size, rank, tp)]]
    if style == "row" and len(full_shape) == 2:
        return [(1, *shard_bounds(full_shape[1], rank, tp))]
    return []  # a row-parallel layer's bias is replicated


def take(full: torch.Tensor, spans: list[tuple[int, int, int]]) -> torch.Tensor:
    """The pieces `spans` of `full`, concatenated (a copy); `full` itself when spans is empty."""
    if not spans:
        return full
    return torch.cat([full.narrow(dim, a, b - a) for dim, a, b in spans], dim=spans[0][0]).clone()


def stage_of(name: str, num_layers: int) -> int:
    """The pipeline layer (0 .. L + 1) a parameter name belongs to (tied head: see build_rank_model)."""
    found = _STAGE_LAYER.match(name)
    if found:
        return 1 + int(found.group(1))
    return num_layers + 1 if name.startswith(("lm.norm.", "lm.lm_head.")) else 0


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def named_init(cfg: ModelConfig, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The full fp32 initial value of parameter `name`, drawn from (seed, name) alone."""
    gen, leaf = _generator(seed, name), name.rsplit(".", 1)[-1]
    if leaf in ("attn_gate", "ff_gate"):
        return torch.full(shape, float(getattr(cfg.xattn, "gate_init", 0.0)))
    if leaf == "latents":
        return torch.randn(shape, generator=gen) * getattr(cfg.perceiver, "latent_init_std", 1.0)
    if len(shape) == 1:  # norms (weight 1, bias 0) and linear biases of random-init modules
        return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
    if name.startswith("lm."):  # an inline (random) LM: DecoderLM's std-0.02 start
        return torch.randn(shape, generator=gen) * 0.02
    bound = 1.0 / math.sqrt(math.prod(shape[1:]))  # nn.Linear / conv default (kaiming a=sqrt(5))
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


# ----------------------------------------------------------------------------- sources


def _vision_state(path: str | None) -> dict[str, torch.Tensor] | None:
    """The tower's checkpoint, memory-mapped: tensors are read only when copied."""
    if path is None:
        return None
    state = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    state = {k.removeprefix("module."): v for k, v in state.get("state_dict", state).items()}
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return state


@dataclasses.dataclass
class _Sources:
    """Where parameter values come from, and what the rank's place is."""

    cfg: ModelConfig
    reader: object | None  # models.hf_slices.SliceReader
    lm_cfg: object
    vocab_ck: int
    vision: dict[str, torch.Tensor] | None
    tp: int
    tp_rank: int
    tp_group: object
    seed: int
    frozen_dtype: torch.dtype
    means: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


def _mean_row(src: _Sources, ours: str, read: torch.Tensor | None) -> torch.Tensor:
    """The mean of all V_ck checkpoint rows of `ours` (collective over TP: each rank sums its rows)."""
    if ours not in src.means:
        total = read.double().sum(dim=0) if read is not None else torch.zeros(src.lm_cfg.hidden_size,
                                                                             dtype=torch.float64)
        if src.tp > 1:  # the ranks' row shards together are all V_ck checkpoint rows
            import torch.distributed as dist

            dist.all_reduce(total, group=src.tp_group)
        src.means[ours] = (total / src.vocab_ck).float()
    return src.means[ours]


def _vocab_rows(src: _Sources, ours: str, span: tuple[int, int]) -> torch.Tensor:
    """Rows [a, b) of the resized (V, D) table `ours`: checkpoint rows, then mean rows past V_ck."""
    from megaflamingo.models.hf_slices import lm_slice

    a, b = span
    read = lm_slice(src.reader, src.lm_cfg, ours, (a, min(b, src.vocab_ck))) if a < src.vocab_ck else None
    if src.cfg.vocab_size <= src.vocab_ck:
        return read
    mean = _mean_row(src, ours, read)  # every TP rank takes part, whatever its rows
    extra = mean.expand(max(0, b - max(a, src.vocab_ck)), -1)
    return extra.clone() if read is None else torch.cat([read.float(), extra]).to(read.dtype)


def _lm_frozen(src: _Sources, ours: str, spans: list[tuple[int, int, int]]) -> torch.Tensor:
    from megaflamingo.models.hf_slices import lm_slice

    if ours in ("embed_tokens.weight", "lm_head.weight"):
        rows = (spans[0][1], spans[0][2]) if spans else (0, src.cfg.vocab_size)
        return _vocab_rows(src, ours, rows)
    if not spans:
        return lm_slice(src.reader, src.lm_cfg, ours)
    dim, a, b = spans[0]
    return lm_slice(src.reader, src.lm_cfg, ours, rows=(a, b) if dim == 0 else None, cols=(a, b) if dim == 1 else None)


def _added_rows(src: _Sources, ids: list[int]) -> torch.Tensor:
    """The trainable added rows: the resized embedding's rows of their ids (the embedding table of
    this rank was materialised first, so the mean row is known)."""
    from megaflamingo.models.hf_slices import lm_slice

    rows = [lm_slice(src.reader, src.lm_cfg, "embed_tokens.weight", (i, i + 1)).float() if i < src.vocab_ck
            else src.means["embed_tokens.weight"][None] for i in ids]
    return torch.cat(rows) if rows else torch.zeros(0, src.lm_cfg.hidden_size)


def _value(src: _Sources, name: str, param: nn.Parameter, full_shape: tuple[int, ...],
           spans: list[tuple[int, int, int]], ids: list[int]) -> torch.Tensor:
    """This rank's value of parameter `name` (local shape), from the checkpoint or the seeded init."""
    if name == "lm.embed_tokens.added" and src.reader is not None:
        return _added_rows(src, ids)
    if name.startswith("lm.") and src.reader is not None and not param.requires_grad:
        return _lm_frozen(src, name[len("lm."):], spans).to(src.frozen_dtype)
    if name.startswith("vision.") and src.vision is not None:
        key = name[len("vision."):].removeprefix("visual.")
        return src.vision[key].to(src.frozen_dtype).clone()
    value = take(named_init(src.cfg, name, full_shape, src.seed), spans)
    return value if param.requires_grad else value.to(src.frozen_dtype)


# ----------------------------------------------------------------------------- the build


def _lm_source(cfg: ModelConfig) -> tuple[object, object, int]:
    """(LM config with the checkpoint's sizes, its SliceReader, checkpoint vocabulary rows)."""
    from megaflamingo.models.families import family_of
    from megaflamingo.models.hf_slices import SliceReader
    from megaflamingo.models.hf_weights import lm_config_from_hf

    if cfg.lm.hf_path is None:
        return cfg.lm, None, cfg.vocab_size
    lm_cfg, reader = lm_config_from_hf(cfg.lm.hf_path), SliceReader(cfg.lm.hf_path)
    family = family_of(lm_cfg)
    if family.hf_mlp_width_key is not None and family.hf_mlp_width_key in reader.names():
        lm_cfg.intermediate_size = reader.shape(family.hf_mlp_width_key)[0]
    lm_cfg.vocab_size = reader.shape(f"{family.hf_module('embed_tokens')}.weight")[0]
    return lm_cfg, reader, lm_cfg.vocab_size


def tp_styles(model: Flamingo) -> dict[str, str | None]:
    """The TP style of every parameter of a plain Flamingo, from its module's path in the plan
    (`parallel.plan.flamingo_tp_plan`); None = replicated. The vocabulary style splits only the
    base table (`weight`): the trainable `added` rows stay replicated."""
    from megaflamingo.parallel.plan import _compile, flamingo_tp_plan

    compiled, styles = _compile(flamingo_tp_plan(model)), {}
    for name, _ in model.named_parameters():
        module, leaf = name.rsplit(".", 1)
        style = next((s for regex, s in compiled if regex.match(module)), None)
        styles[name] = None if style == "vocab" and leaf != "weight" else style
    return styles


FROZEN_DTYPES = {None: torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16}
"""model.frozen_dtype -> the dtype frozen weights are materialised in (None: fp32, the engine casts)."""


def build_rank_model(cfg: ModelConfig, groups=None, parts: list[int] | None = None, *, seed: int = 0,
                     frozen_dtype: torch.dtype | None = None) -> tuple[Flamingo, object]:
    """This rank's Flamingo: its pipeline stage's parameters at their TP shapes, the rest on meta.

    Args:
        cfg: the resolved model config (vocab_size and token ids set; `lm.hf_path` a safetensors
            checkpoint or None for an inline random LM; `vision.weights` an open_clip file or None).
        groups: this rank's `ProcessGroups` (tp > 1 shards over `groups.tp`), or None: one rank.
        parts: pipeline stage boundaries over the layers [embed, L blocks, head] (stage =
            groups.pp_rank), or None: every layer.
        seed: seeds the initial values of every parameter not read from a checkpoint, by name.
        frozen_dtype: dtype of the frozen weights; None: `cfg.frozen_dtype` (trainable ones are fp32).
    Returns:
        (model, reader): the model, and the `SliceReader` whose `reads` list every slice read
        (None for an inline LM).
    Raises:
        FileNotFoundError / ValueError: a missing or truncated checkpoint shard (one line, naming it).
    """
    from megaflamingo.models.flamingo import build_model, resolve_token_ids
    from megaflamingo.parallel.layers import sum_gradient_over
    from megaflamingo.parallel.plan import apply_tensor_parallel

    cfg = resolve_token_ids(cfg)
    frozen_dtype = frozen_dtype or FROZEN_DTYPES[cfg.frozen_dtype]
    lm_cfg, reader, vocab_ck = _lm_source(cfg)
    plain = dataclasses.replace(cfg, lm=dataclasses.replace(lm_cfg, hf_path=None),
                                vision=dataclasses.replace(cfg.vision, weights=None))
    with params_on_meta():
        model = build_model(plain)
    full = {n: tuple(p.shape) for n, p in model.named_parameters()}
    styles = tp_styles(model)
    tp, tp_rank = (groups.dims.tp, groups.tp_rank) if groups is not None else (1, 0)
    if tp > 1:
        apply_tensor_parallel(model, groups)
    L = len(model.lm.layers)
    stage = groups.pp_rank if groups is not None else 0
    mine = set(range(parts[stage], parts[stage + 1])) if parts is not None else set(range(L + 2))
    tied_last = model.lm.lm_head is None and parts is not None and L + 1 in mine
    src = _Sources(cfg, reader, lm_cfg, vocab_ck, _vision_state(cfg.vision.weights), tp, tp_rank,
                   groups.tp if groups is not None else None, seed, frozen_dtype)
    ids = sorted({cfg.media_token_id, cfg.eoc_token_id}) if not cfg.freeze_lm_embeddings else []
    for name, param in list(model.named_parameters()):
        if stage_of(name, L) not in mine and not (tied_last and name.startswith("lm.embed_tokens.")):
            continue
        spans = local_spans(styles.get(name), full[name], tp, tp_rank)
        value = _value(src, name, param, full[name], spans, ids)
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{name}: materialised {tuple(value.shape)}, the rank holds {tuple(param.shape)}")
        owner, leaf = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
        new = nn.Parameter(value.contiguous(), requires_grad=param.requires_grad)
        new.__dict__.update(param.__dict__)  # TP tags (model_parallel, ...) carry over
        owner._parameters[leaf] = new
        if tp > 1 and leaf == "attn_gate":  # the meta gate's gradient hook went with it
            sum_gradient_over(new, groups.tp)
    return model, reader
