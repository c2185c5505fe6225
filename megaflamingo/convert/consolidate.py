"""A training checkpoint of any layout (TP / PP / ZeRO 0-3 shards) -> the plain trainable state dict.

Reads DeepSpeed 0.19's checkpoint files directly (torch.load; no process group, no engine), as
`training/loop.py` writes them (`exclude_frozen_parameters=True`: the trainable state only):

| layout          | files in the step directory                     | where the weights are          |
|-----------------|--------------------------------------------------|--------------------------------|
| ZeRO 0/1/2      | mp_rank_<tp>_model_states.pt                     | ["module"], one file per TP rank |
| ZeRO-3          | zero_pp_rank_<dp>_mp_rank_<tp>_model_states.pt   | ["param_shapes"]: names, shapes |
|                 | zero_pp_rank_<dp>_mp_rank_<tp>_optim_states.pt   | fp32 flat partitions per DP rank |
| pipeline (ZeRO 0/1) | layer_<l>-model_<tp>-model_states.pt         | one state dict per layer and TP rank |

ZeRO-3 partitions: every parameter is split into dp pieces of ceil(numel / dp) elements (the
last padded), and each DP rank's flat buffer is its pieces of all parameters in order. Names are
the wrapper's (`model.xattn.0.to_q.weight`) or, in a pipeline, the stage layer's
(`fusion.xattn.to_q.weight` in layer 1 + i); both are matched to the plain model's trainable names
by their trailing name components (pipeline layer l: embed 0, decoder blocks 1..L, head L + 1).
TP shards are put back together by comparing their shape with the plain parameter's: same shape
means replicated, else the one differing dim is the sharded one; a fused k;v projection
(`to_kv`) is sharded per half (`PARTS`). Shards of unequal size (vocabularies) concatenate as they
are. H7's resharding reuses `read_shards` / `merge_tp` / `split_tp`.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable, Mapping

import torch

PARTS = {"to_kv.weight": 2}
"""Parameter name endings whose rows are `parts` equal blocks sharded one by one (k and v)."""

_MP = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_ZERO3 = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_LAYER = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
_ANCHOR = re.compile(r"(^|\.)anchors\.\d+$")


class ConsolidationError(ValueError):
    """A checkpoint directory cannot be consolidated (one line naming the file or key)."""


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated / corrupt pickles raise many types
        raise ConsolidationError(f"cannot read {path}: {type(err).__name__}: {str(err).splitlines()[0][:120]}") from None


def checkpoint_layout(step_dir: Path) -> str:
    """"pipeline", "zero3" or "plain" from the files present.

    Raises:
        ConsolidationError: no DeepSpeed model-state file in `step_dir`.
    """
    names = [p.name for p in step_dir.iterdir()] if step_dir.is_dir() else []
    if any(_LAYER.match(n) for n in names):
        return "pipeline"
    if any(_ZERO3.match(n) for n in names):
        return "zero3"
    if any(_MP.match(n) for n in names):
        return "plain"
    raise ConsolidationError(f"{step_dir}: no DeepSpeed model states (mp_rank_*, zero_pp_rank_*, layer_*)")


# ----------------------------------------------------------------------------- reading shards


def _plain_shards(step_dir: Path) -> dict[int, dict[str, torch.Tensor]]:
    shards = {}
    for path in sorted(step_dir.glob("mp_rank_*_model_states.pt")):
        module = _load(path).get("module")
        if module is None:
            raise ConsolidationError(f"{path}: holds no module weights")
        shards[int(_MP.match(path.name)[1])] = dict(module)
    return shards


def _zero3_tp_rank(step_dir: Path, tp: int, dp_ranks: list[int]) -> dict[str, torch.Tensor]:
    """One TP rank's parameters from its DP ranks' fp32 partitions (module docstring)."""
    shapes, flats = None, []
    for dp in dp_ranks:
        model_file = step_dir / f"zero_pp_rank_{dp}_mp_rank_{tp:02d}_model_states.pt"
        optim_file = step_dir / f"zero_pp_rank_{dp}_mp_rank_{tp:02d}_optim_states.pt"
        if not optim_file.is_file():
            raise ConsolidationError(f"missing ZeRO-3 partition file {optim_file}")
        if shapes is None:
            shapes = {k: v for group in _load(model_file)["param_shapes"] for k, v in group.items()}
        groups = _load(optim_file)["optimizer_state_dict"]["fp32_flat_groups"]
        flats.append(torch.cat([g.flatten() for g in groups]))
    out, offset = {}, 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        piece = math.ceil(numel / len(flats))
        if offset + piece > flats[0].numel():
            raise ConsolidationError(f"{step_dir}: ZeRO-3 partitions of mp rank {tp} end before '{name}' (truncated?)")
        full = torch.cat([flat[offset:offset + piece] for flat in flats])[:numel]
        out[name] = full.view(shape).clone()
        offset += piece
    return out


def _zero3_shards(step_dir: Path) -> dict[int, dict[str, torch.Tensor]]:
    ranks: dict[int, list[int]] = defaultdict(list)
    for path in step_dir.iterdir():
        if m := _ZERO3.match(path.name):
            ranks[int(m[2])].append(int(m[1]))
    for tp, dps in ranks.items():
        if sorted(dps) != list(range(len(dps))):
            raise ConsolidationError(f"{step_dir}: ZeRO-3 files of mp rank {tp} cover DP ranks {sorted(dps)}")
    return {tp: _zero3_tp_rank(step_dir, tp, sorted(dps)) for tp, dps in sorted(ranks.items())}


def _pipeline_shards(step_dir: Path) -> dict[int, dict[str, torch.Tensor]]:
    """TP rank -> {"<layer>:<layer-local name>": tensor}."""
    shards: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    for path in sorted(step_dir.iterdir()):
        if m := _LAYER.match(path.name):
            layer, tp = int(m[1]), int(m[2])
            for name, tensor in _load(path).items():
                if not _ANCHOR.search(name):
                    shards[tp][f"{layer}:{name}"] = tensor
    return dict(shards)


def read_shards(step_dir: str | Path) -> tuple[str, dict[int, dict[str, torch.Tensor]]]:
    """(layout, {tp rank: {name as saved: tensor}}) of a checkpoint step directory."""
    step_dir = Path(step_dir)
    layout = checkpoint_layout(step_dir)
    reader: Callable = {"plain": _plain_shards, "zero3": _zero3_shards, "pipeline": _pipeline_shards}[layout]
    shards = reader(step_dir)
    if sorted(shards) != list(range(len(shards))):
        raise ConsolidationError(f"{step_dir}: tensor-parallel ranks {sorted(shards)} are not 0..{len(shards) - 1}")
    return layout, shards


# ----------------------------------------------------------------------------- names


def _layer_of(name: str, num_layers: int) -> int:
    """The pipeline layer that holds plain parameter `name` (embed 0, blocks 1..L, head L + 1)."""
    m = re.match(r"^(?:xattn|lm\.layers)\.(\d+)\.", name)
    if m:
        return int(m[1]) + 1
    return num_layers + 1 if name.startswith(("lm.norm.", "lm.lm_head.")) else 0


def _strip_index(name: str) -> list[str]:
    return [p for p in re.sub(r"^(xattn|lm\.layers)\.\d+\.", r"\1.", name).split(".")]


def _trailing_match(a: list[str], b: list[str]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def plain_name(saved: str, candidates: list[str], layer_local: bool = False) -> str:
    """The candidate sharing the most trailing name components with `saved` (ties: the one with
    the fewest components left over; the winner must be unique). `layer_local`: `saved` is a
    pipeline layer's name, which has no `xattn.<i>` / `lm.layers.<i>` index to compare.

    Raises:
        ConsolidationError: no candidate, or a tie.
    """
    parts = saved.split(".")
    scores = []
    for c in candidates:  # most trailing components in common, then fewest left over
        stripped = _strip_index(c) if layer_local else c.split(".")
        matched = _trailing_match(parts, stripped)
        scores.append(((matched, matched - len(stripped)), c))
    best = max((s for s, _ in scores), default=(0, 0))
    winners = [c for s, c in scores if s == best]
    if best[0] == 0 or len(winners) != 1:
        raise ConsolidationError(f"checkpoint key '{saved}' matches no single model parameter "
                                 f"({', '.join(winners[:3]) or 'none'})")
    return winners[0]


def _rename(layout: str, shard: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size]) -> dict:
    names = list(expected)
    num_layers = 1 + max((int(m[1]) for n in names if (m := re.match(r"^lm\.layers\.(\d+)\.", n))), default=-1)
    num_layers = max(num_layers, 1 + max((int(m[1]) for n in names if (m := re.match(r"^xattn\.(\d+)\.", n))),
                                         default=-1))
    out: dict[str, torch.Tensor] = {}
    for saved, tensor in shard.items():
        if layout == "pipeline":
            layer, local = saved.split(":", 1)
            candidates = [n for n in names if _layer_of(n, num_layers) == int(layer)]
            if int(layer) == num_layers + 1:  # a tied head's copy of the added rows
                candidates += [n for n in names if n.startswith("lm.embed_tokens.")]
            name = plain_name(local, candidates, layer_local=True)
        else:
            name = plain_name(saved, names)
        out.setdefault(name, tensor)  # a tied head's copy equals the first stage's
    return out


# ----------------------------------------------------------------------------- TP


def merge_tp(name: str, shards: list[torch.Tensor], full: torch.Size) -> torch.Tensor:
    """One parameter from its TP shards (rank order), given the plain parameter's shape.

    Raises:
        ConsolidationError: the shards do not add up to `full`.
    """
    if tuple(shards[0].shape) == tuple(full):
        return shards[0]
    dims = [d for d in range(len(full)) if shards[0].shape[d] != full[d]]
    if len(dims) != 1:
        raise ConsolidationError(f"'{name}': shard shape {tuple(shards[0].shape)} does not fit {tuple(full)}")
    dim, parts = dims[0], next((p for end, p in PARTS.items() if name.endswith(end)), 1)
    blocks = [torch.cat([s.chunk(parts, dim=dim)[j] for s in shards], dim=dim) for j in range(parts)]
    merged = torch.cat(blocks, dim=dim)
    if tuple(merged.shape) != tuple(full):
        raise ConsolidationError(f"'{name}': {len(shards)} shards give {tuple(merged.shape)}, expected {tuple(full)}")
    return merged


def split_tp(name: str, full: torch.Tensor, rank: int, world: int, dim: int) -> torch.Tensor:
    """The inverse of `merge_tp` for one rank: rows (dim 0) or columns (dim 1) as `shard_bounds`."""
    parts = next((p for end, p in PARTS.items() if name.endswith(end)), 1)
    out = []
    for block in full.chunk(parts, dim=dim):
        size = block.shape[dim]
        start = rank * (size // world) + min(rank, size % world)
        out.append(block.narrow(dim, start, size // world + (1 if rank < size % world else 0)))
    return torch.cat(out, dim=dim)


def consolidate(step_dir: str | Path, expected: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The plain trainable state dict of a training checkpoint, whatever its layout.

    Args:
        step_dir: a complete checkpoint directory (e.g. `<run>/checkpoints/step_00000040`).
        expected: plain trainable parameter name -> full shape (`trainable_shapes(model)`).
    Returns:
        {plain name: full tensor}, exactly the values saved (dtype as saved).
    Raises:
        ConsolidationError: unreadable or truncated files, a key that fits no parameter, shards
            that do not fit, or a trainable parameter absent from the checkpoint.
    """
    layout, shards = read_shards(step_dir)
    renamed = [_rename(layout, shards[tp], expected) for tp in range(len(shards))]
    missing = [n for n in expected if n not in renamed[0]]
    if missing:
        raise ConsolidationError(f"{step_dir}: checkpoint lacks trainable parameter '{missing[0]}' "
                                 f"({len(missing)} missing; a different model config?)")
    return {name: merge_tp(name, [r[name] for r in renamed], expected[name]) for name in expected}


def trainable_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    """Plain trainable parameter name -> shape of a single-process model."""
    return {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
