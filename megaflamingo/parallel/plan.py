"""The tensor-parallel plan: which linear / embedding modules of a built Flamingo become parallel ones.

Shapes: B batch, T text tokens, D LM width, H heads, G key/value heads, K head dim; `_local` is
this rank's share (H / tp, G / tp).

torchtitan-style: a plan is a table of module-path patterns (`*` = one path segment, a layer
index) -> style, and `apply_tensor_parallel` swaps exactly the matching modules, nothing else:

| style     | becomes                                   | used for                                   |
|-----------|-------------------------------------------|--------------------------------------------|
| column    | `ColumnParallelLinear` (output rows)      | q/k/v, gate/up, untied head, xattn to_q, ff.up |
| column_kv | `ColumnParallelLinear`, k and v halves apart | xattn to_kv (fused [k; v])              |
| row       | `RowParallelLinear` (input columns)       | o, down, xattn to_out, ff.down             |
| vocab     | `VocabParallelEmbedding` (`added` replicated) | the token embedding's base table       |

The LM part of the plan is the family's (`models.families.Family.tp_plan`, under `lm.`); the
cross-attention part (`XATTN_TP_PLAN`, under `xattn.*.`) is the same for every family. Norms,
gates, the Perceiver and the vision tower stay replicated. The model's own classes and forwards
run unchanged on the shards: they read their local head counts off the projections' widths, and
self-attention cuts ALiBi slopes to its shard's heads. One thing besides the swaps: tanh(attn_gate)
scales the *local* cross-attention heads before the row-parallel to_out sums them, so each rank's
gate gradient is a partial sum; `sum_gradient_over` makes it the full one (backward all-reduce,
the adjoint of using one replicated gate on every rank).

Parameter names do not change, so `gather_full_state` gives back the plain model's state dict.
The logits then cover the vocabulary rows [`logits_vocab_start(model.lm)`, ...) of this rank.
With tp == 1 nothing is swapped: the plain model trains as it is.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn

from megaflamingo.models.decoder import DecoderLM
from megaflamingo.models.families import family_of
from megaflamingo.models.flamingo import Flamingo
from megaflamingo.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    sum_gradient_over,
)
from megaflamingo.parallel.topology import ProcessGroups

XATTN_TP_PLAN: dict[str, str] = {
    "to_q": "column", "to_kv": "column_kv", "to_out": "row", "ff.up": "column", "ff.down": "row",
}
"""The gated cross-attention block's plan (relative to `xattn.<i>.`)."""

PARALLEL_STYLES: dict[str, Callable[[nn.Module, dist.ProcessGroup], nn.Module]] = {
    "column": lambda m, g: ColumnParallelLinear.from_linear(m, g),
    "column_kv": lambda m, g: ColumnParallelLinear.from_linear(m, g, parts=2),
    "row": lambda m, g: RowParallelLinear.from_linear(m, g),
    "vocab": lambda m, g: VocabParallelEmbedding(m, g),
}
"""Style name -> builder of the parallel module from the full one."""


def flamingo_tp_plan(model: Flamingo) -> dict[str, str]:
    """The whole model's plan: the LM family's under `lm.`, `XATTN_TP_PLAN` under `xattn.*.`."""
    lm_plan = family_of(model.lm.cfg).tp_plan
    return {**{f"lm.{k}": v for k, v in lm_plan.items()}, **{f"xattn.*.{k}": v for k, v in XATTN_TP_PLAN.items()}}


def _compile(plan: Mapping[str, str]) -> list[tuple[re.Pattern, str]]:
    """Patterns as regular expressions (`*` = one dotted segment); unknown styles rejected."""
    compiled = []
    for pattern, style in plan.items():
        if style not in PARALLEL_STYLES:
            raise ValueError(f"TP plan entry '{pattern}': unknown style '{style}' "
                             f"(expected {', '.join(PARALLEL_STYLES)})")
        regex = r"\.".join("[^.]+" if part == "*" else re.escape(part) for part in pattern.split("."))
        compiled.append((re.compile(regex + "$"), style))
    return compiled


def match_plan(model: nn.Module, plan: Mapping[str, str]) -> dict[str, str]:
    """Which modules of `model` a plan swaps, and how.

    Args:
        model: the module to parallelise.
        plan: module-path pattern -> style (see the module docstring).
    Returns:
        {module path: style}, in module order (the first matching pattern wins).
    Raises:
        ValueError: a style not in `PARALLEL_STYLES`.
    """
    compiled, matched = _compile(plan), {}
    for path, _ in model.named_modules():
        style = next((s for regex, s in compiled if regex.match(path)), None)
        if style is not None:
            matched[path] = style
    return matched


def apply_plan(model: nn.Module, plan: Mapping[str, str], group: dist.ProcessGroup) -> list[str]:
    """Swap every module whose path matches a plan pattern for its parallel version, in place.

    Args:
        model: the module to parallelise (every rank of `group` holds the same full weights).
        plan: module-path pattern -> style (see the module docstring).
        group: the tensor-parallel process group.
    Returns:
        The paths swapped, in module order.
    Raises:
        ValueError: a style not in `PARALLEL_STYLES`.
    """
    matched = match_plan(model, plan)
    for path, style in matched.items():
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, PARALLEL_STYLES[style](model.get_submodule(path), group))
    return list(matched)


def _check_divisible(model: Flamingo, world: int) -> None:
    cfg = model.lm.cfg
    counts = {"num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads or cfg.num_heads}
    counts.update({f"xattn.{i}.heads": block.heads for i, block in model.xattn.items()})
    for what, count in counts.items():
        if count % world:
            raise ValueError(f"tensor parallelism over {world} ranks does not divide {what}={count}")


def apply_tensor_parallel(model: Flamingo, groups: ProcessGroups) -> Flamingo:
    """Swap a built, plain Flamingo's linear / embedding modules for tensor-parallel ones, in place.

    Every rank of the group must hold the same full weights when this is called (build with the
    same seed or load the same checkpoint); each keeps only its shards. With tp == 1 the model is
    returned unchanged.

    Args:
        model: the plain model, trainable set already fixed.
        groups: this rank's process groups (the tensor-parallel one is used).
    Returns:
        The same model object, parallelised.
    Raises:
        ValueError: tp does not divide the LM's query or key/value heads or the xattn heads.
    """
    if groups.dims.tp == 1:
        return model
    _check_divisible(model, groups.dims.tp)
    apply_plan(model, flamingo_tp_plan(model), groups.tp)
    for block in model.xattn.values():
        sum_gradient_over(block.attn_gate, groups.tp)
    return model


def logits_vocab_start(lm: DecoderLM) -> int:
    """First vocabulary row of this rank's logits (0 without tensor parallelism)."""
    if lm.lm_head is None:
        return getattr(lm.embed_tokens, "vocab_start", 0)
    return getattr(lm.lm_head, "shard_start", 0)


def gather_full_state(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The plain (unsharded) parameters of a model parallelised by `apply_tensor_parallel`.

    Collective over each parallel layer's group: every rank of the group must call it (with the
    same `trainable_only`). Under ZeRO-3 call it inside `deepspeed.zero.GatheredParameters`.

    Args:
        model: the parallelised model (or any module holding its layers).
        trainable_only: leave out frozen parameters (and skip gathering them).
    Returns:
        {name: full tensor}, with the plain model's names.
    """
    state = {}
    for prefix, module in model.named_modules():
        own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad or not trainable_only}
        if not own:
            continue
        full = module.full_state(own.keys()) if hasattr(module, "full_state") else {}
        for name, param in own.items():
            key = f"{prefix}.{name}" if prefix else name
            state[key] = full[name] if name in full else param.detach().clone()
    return state
