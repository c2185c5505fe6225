"""Which parameters each rank holds: pipeline stage by name, tensor-parallel share by the TP plan.

Shapes: V vocabulary rows, D LM width; `tp` ranks in a tensor-parallel group, `pp` stages.

Pipeline layers (as `parallel/pipeline.py` builds them): 0 = vision tower + Perceiver + token
embedding, 1 + i = (cross-attention block i, decoder layer i), L + 1 = final norm + LM head (with a
tied head the last stage holds the embedding table too). Tensor-parallel shares follow the plan
of `parallel/plan.py`:

| parameters                                                     | split over tp              |
|----------------------------------------------------------------|----------------------------|
| q/k/v_proj, gate/up_proj (weight, bias); xattn to_q, to_kv, ff.up | rows (column-parallel)  |
| o_proj, down_proj weight; xattn to_out, ff.down                 | columns (row-parallel)     |
| embed_tokens.weight (base table), lm_head.weight                | vocabulary rows, uneven    |
| everything else (row-parallel biases, norms, gates, added rows, | replicated                 |
|   Perceiver, vision tower)                                     |                            |
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch.nn as nn

from megaflamingo.parallel.layers import shard_bounds

_COLUMN = re.compile(r"\.attn\.[qkv]_proj\.(weight|bias)$|\.mlp\.(gate|up)_proj\.(weight|bias)$"
                     r"|^xattn\.\d+\.(to_q|to_kv|ff\.up)\.weight$")
_ROW = re.compile(r"\.attn\.o_proj\.weight$|\.mlp\.down_proj\.weight$|^xattn\.\d+\.(to_out|ff\.down)\.weight$")
_VOCAB = re.compile(r"^lm\.(embed_tokens\.weight|lm_head\.weight)$")
_LAYER = re.compile(r"^(?:lm\.layers|xattn)\.(\d+)\.")
_FIRST = ("vision.", "perceiver.", "lm.embed_tokens.")
_LAST = ("lm.norm.", "lm.lm_head.")


def tp_split(name: str) -> str:
    """"column", "row", "vocab" or "replicated": how tensor parallelism splits parameter `name`."""
    for kind, pattern in (("column", _COLUMN), ("row", _ROW), ("vocab", _VOCAB)):
        if pattern.search(name):
            return kind
    return "replicated"


def local_numel(name: str, shape: tuple[int, ...], tp: int, tp_rank: int) -> int:
    """Elements of parameter `name` (full `shape`) that tensor-parallel rank `tp_rank` of `tp` holds."""
    kind, total = tp_split(name), 1
    for size in shape:
        total *= size
    if kind == "replicated" or tp == 1:
        return total
    if kind == "vocab":
        start, end = shard_bounds(shape[0], tp_rank, tp)
        return (end - start) * total // shape[0]
    dim = 0 if kind == "column" else 1
    start, end = shard_bounds(shape[dim], tp_rank, tp)
    return (end - start) * total // shape[dim]


def pipeline_layers(name: str, num_layers: int, tied: bool) -> tuple[int, ...]:
    """The pipeline layers (0 .. num_layers + 1) that hold parameter `name`."""
    match = _LAYER.match(name)
    if match:
        return (1 + int(match.group(1)),)
    if name.startswith(_LAST):
        return (num_layers + 1,)
    if name.startswith(_FIRST):
        return (0, num_layers + 1) if tied and name.startswith("lm.embed_tokens.") else (0,)
    raise ValueError(f"parameter '{name}' belongs to no pipeline layer")


@dataclass
class ParamCounts:
    """Parameter elements one rank holds, split frozen / trainable and by component."""

    frozen: int = 0
    trainable: int = 0
    by_component: dict[str, int] = field(default_factory=dict)
    largest_layer: int = 0
    """Elements of the largest pipeline layer on this rank (ZeRO-3 gathers one at a time)."""

    @property
    def total(self) -> int:
        return self.frozen + self.trainable


def _component(name: str) -> str:
    head = name.split(".")[0]
    if head == "lm":
        part = name.split(".")[1]
        return "lm_layers" if part == "layers" else f"lm_{part}"
    return head


def rank_params(model: nn.Module, parts: list[int], stage: int, tp: int, tp_rank: int) -> ParamCounts:
    """What the rank at pipeline `stage`, tensor-parallel rank `tp_rank` holds.

    Args:
        model: the (meta-device) Flamingo.
        parts: stage boundaries over the pipeline layers, [0, b_1, ..., L + 2].
        stage: this rank's pipeline stage.
        tp, tp_rank: tensor-parallel group size and this rank's place in it.
    Returns:
        The rank's `ParamCounts`.
    """
    num_layers = len(model.lm.layers)
    tied = model.lm.lm_head is None
    mine = range(parts[stage], parts[stage + 1])
    counts, per_layer = ParamCounts(), {}
    for name, param in model.named_parameters():
        layers = [i for i in pipeline_layers(name, num_layers, tied and len(parts) > 2) if i in mine]
        if not layers:
            continue
        n = local_numel(name, tuple(param.shape), tp, tp_rank)
        if param.requires_grad:
            counts.trainable += n
        else:
            counts.frozen += n
        comp = _component(name)
        counts.by_component[comp] = counts.by_component.get(comp, 0) + n
        per_layer[layers[0]] = per_layer.get(layers[0], 0) + n
    counts.largest_layer = max(per_layer.values(), default=0)
    return counts
