"""Which parameters each rank holds: pipeline stage by name, tensor-parallel share by the TP plan.

Shapes: V vocabulary rows, D LM width; `tp` ranks in a tensor-parallel group, `pp` stages.

Pipeline layers (as `parallel/pipeline.py` builds them): 0 = vision tower + Perceiver + token
embedding, 1 + i = (cross-attention block i, decoder layer i), L + 1 = final norm + LM head (with a
tied head the last stage holds the embedding table too). Tensor-parallel shares follow the model's
own plan (`parallel.plan.flamingo_tp_plan`: the LM family's table and the cross-attention one) and
the slicing of `parallel.materialize.local_spans`, the function rank-local building uses: column
styles split a weight's (and bias's) rows, row styles a weight's columns (the bias is replicated),
the vocabulary style the embedding's base-table rows (unevenly when tp does not divide V);
everything else (norms, gates, added rows, Perceiver, vision tower) is replicated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch.nn as nn

from megaflamingo.parallel.materialize import local_spans, stage_of, tp_styles


def local_numel(style: str | None, shape: tuple[int, ...], tp: int, tp_rank: int) -> int:
    """Elements of a parameter of full `shape` that tensor-parallel rank `tp_rank` of `tp` holds."""
    spans = local_spans(style, shape, tp, tp_rank)
    if not spans:
        return math.prod(shape)
    dim = spans[0][0]
    return sum(b - a for _, a, b in spans) * math.prod(shape) // shape[dim]


def pipeline_layers(name: str, num_layers: int, tied: bool) -> tuple[int, ...]:
    """The pipeline layers (0 .. num_layers + 1) that hold parameter `name`."""
    layer = stage_of(name, num_layers)
    return (0, num_layers + 1) if tied and name.startswith("lm.embed_tokens.") else (layer,)


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
    counts, per_layer, styles = ParamCounts(), {}, tp_styles(model)
    for name, param in model.named_parameters():
        layers = [i for i in pipeline_layers(name, num_layers, tied and len(parts) > 2) if i in mine]
        if not layers:
            continue
        n = local_numel(styles[name], tuple(param.shape), tp, tp_rank)
        if param.requires_grad:
            counts.trainable += n
        else:
            counts.frozen += n
        comp = _component(name)
        counts.by_component[comp] = counts.by_component.get(comp, 0) + n
        per_layer[layers[0]] = per_layer.get(layers[0], 0) + n
    counts.largest_layer = max(per_layer.values(), default=0)
    return counts
