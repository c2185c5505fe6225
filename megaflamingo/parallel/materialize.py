"""Build only this rank's share of a Flamingo: meta-device construction, then its stage and TP slices.

    model, reader = build_rank_model(cfg, groups, parts, seed=s)   # parts: stage boundaries (None: all)

1. Every parameter is created on the meta device (`models.materialize.params_on_meta`), so the
   full model's shapes exist and nothing else.
2. The tensor-parallel plan (`parallel.plan.apply_tensor_parallel`) swaps modules on the meta
   device: the parameters take their local shapes.
3. Each parameter of this rank's pipeline stage is materialised at its local shape, on the CPU,
   by the one-rank build's rules (`models.materialize`): checkpoint slices read once, the rest
   drawn from (seed, parameter name) row by row, so every layout starts from the values of the
   single-process model (`models.flamingo.build_model`, the tp = pp = 1 case of this build);
   vocabulary mean rows are summed over the TP group. Parameters of other stages stay on the
   meta device: no rank ever holds the full model, nor a full tensor of a TP-sharded layer.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import torch

from megaflamingo.config import ModelConfig
from megaflamingo.models.flamingo import Flamingo
from megaflamingo.models.materialize import Spans, materialise, start_build
from megaflamingo.parallel.layers import shard_bounds

_STAGE_LAYER = re.compile(r"^(?:lm\.layers|xattn)\.(\d+)\.")


def local_spans(style: str | None, full_shape: tuple[int, ...], tp: int, rank: int) -> Spans:
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


def stage_of(name: str, num_layers: int) -> int:
    """The pipeline layer (0 .. L + 1) a parameter name belongs to (tied head: see build_rank_model)."""
    found = _STAGE_LAYER.match(name)
    if found:
        return 1 + int(found.group(1))
    return num_layers + 1 if name.startswith(("lm.norm.", "lm.lm_head.")) else 0


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


@dataclasses.dataclass(frozen=True)
class RankShard:
    """What a rank-local build holds; set on the model as `model.rank_shard` (the engine reads it
    instead of applying the TP plan and partitioning again)."""

    tp: int
    tp_rank: int
    stage: int
    parts: tuple[int, ...] | None
    """Pipeline stage boundaries over [embed, L blocks, head]; None: every layer (no pipeline)."""


def _held_layers(model: Flamingo, shard: RankShard) -> tuple[set[int], bool]:
    """(pipeline layers this rank materialises, whether it also needs the embedding for a tied head)."""
    L = len(model.lm.layers)
    if shard.parts is None:
        return set(range(L + 2)), False
    mine = set(range(shard.parts[shard.stage], shard.parts[shard.stage + 1]))
    return mine, model.lm.lm_head is None and L + 1 in mine


def _tp_sum(group) -> Callable[[torch.Tensor], None]:
    import torch.distributed as dist

    return lambda total: dist.all_reduce(total, group=group)


def build_rank_model(cfg: ModelConfig, groups=None,
                     parts: Sequence[int] | Callable[[Flamingo], Sequence[int]] | None = None, *, seed: int = 0,
                     frozen_dtype: torch.dtype | None = None) -> tuple[Flamingo, object]:
    """This rank's Flamingo: its pipeline stage's parameters at their TP shapes, the rest on meta.

    With groups None and parts None this is the single-process model (`models.flamingo.build_model`).

    Args:
        cfg: the resolved model config (vocab_size and token ids set; `lm.hf_path` a checkpoint
            directory or None for an inline random LM; `vision.weights` a tower weights file or None).
        groups: this rank's `ProcessGroups` (tp > 1 shards over `groups.tp`), or None: one rank.
        parts: pipeline stage boundaries over the layers [embed, L blocks, head] (stage =
            groups.pp_rank), or a function of the meta-device model (before TP) giving them, or
            None: every layer.
        seed: seeds the initial values of every parameter not read from a checkpoint, by name.
        frozen_dtype: dtype of the frozen weights; None: `cfg.frozen_dtype` (trainable ones are fp32).
    Returns:
        (model, reader): the model (`model.rank_shard` says what it holds), and the reader whose
        `reads` list every checkpoint slice read (None for an inline LM).
    Raises:
        FileNotFoundError / ValueError: a missing or truncated checkpoint shard (one line, naming it);
            tp does not divide the heads; a multi-rank build of a checkpoint that is not safetensors.
    """
    from megaflamingo.parallel.layers import sum_gradient_over
    from megaflamingo.parallel.plan import apply_tensor_parallel

    tp, tp_rank = (groups.dims.tp, groups.tp_rank) if groups is not None else (1, 0)
    stage, pp = (groups.pp_rank, groups.dims.pp) if groups is not None else (0, 1)
    model, src = start_build(cfg, tp * pp, frozen_dtype, seed, held_vision=parts is None or stage == 0)
    if callable(parts):
        parts = parts(model)
    shard = RankShard(tp, tp_rank, stage, tuple(parts) if parts is not None else None)
    full, styles = {n: tuple(p.shape) for n, p in model.named_parameters()}, tp_styles(model)
    if tp > 1:
        apply_tensor_parallel(model, groups)
        src.reduce = _tp_sum(groups.tp)
    mine, tied_last = _held_layers(model, shard)
    L = len(model.lm.layers)
    made = materialise(model, src, full, spans_of=lambda n: local_spans(styles.get(n), full[n], tp, tp_rank),
                       held=lambda n: stage_of(n, L) in mine or (tied_last and n.startswith("lm.embed_tokens.")))
    for name, param in made:
        if tp > 1 and name.endswith(".attn_gate"):  # the meta gate's gradient hook went with it
            sum_gradient_over(param, groups.tp)
    model.rank_shard = shard
    return model, src.reader
