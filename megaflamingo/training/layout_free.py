"""Layout-free training state: trainable weights and Adam moments under the plain model's names.

Every checkpoint holds, beside DeepSpeed's own (layout-bound) files, `layout_free/part_<k>.pt`:

    {"format": 1, "adam_step": int,
     "params": {plain name: {"param": fp32 tensor, "exp_avg": ..., "exp_avg_sq": ...}}}

each tensor whole (ZeRO partitions and TP shards put together), one file per pipeline stage
(written by the stage's first TP/DP rank; a stage-shared parameter such as the tied `<image>` /
`<|endofchunk|>` rows appears in two files with the same values). The union of the files is the
trainable state of the single-process model, so any (tp, pp, dp, zero_stage) loads it:
`load_layout_free` cuts each tensor into this rank's TP shard and writes it into the engine's
weights, fp32 master weights and Adam state, whatever ZeRO stage holds them.

How a rank finds its shard without knowing each layer's split rule: `_shard_index` fills every
local parameter with (tp_rank * 2^32 + local element index) in float64, gathers it with the
layers' own `full_state` (the same collective that gathers weights), and reads back which full
element each local element is. Columns, rows, fused k;v halves, uneven vocabulary shards and
replicated parameters are all covered by that one rule.

DeepSpeed 0.19 creates Adam state lazily at the first optimizer step and has no public call to
create it; `_adam_owners` names the tensors its ZeRO optimizers key the state by
(`single_partition_of_fp32_groups` for ZeRO-1/2, `fp32_partitioned_groups_flat` for ZeRO-3), and
`_set_zero3` writes ZeRO-3 partitions itself (its public setter mishandles padded partitions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from megaflamingo.parallel.plan import gather_full_state
from megaflamingo.parallel.topology import ProcessGroups

DIR = "layout_free"
FORMAT = 1
KEYS = ("param", "exp_avg", "exp_avg_sq")
_SHIFT = 2.0**32


class LayoutError(ValueError):
    """A checkpoint cannot be mapped onto this layout (one line: what and why)."""


# ----------------------------------------------------------------------------- engine access


def _is_pipeline(engine: Any) -> bool:
    return hasattr(engine.module, "flamingo_names")


def _trainable(engine: Any) -> dict[str, nn.Parameter]:
    """{plain model name: this rank's trainable parameter} (pipeline anchors left out)."""
    module = engine.module
    if _is_pipeline(engine):
        names = module.flamingo_names
        return {names[n]: p for n, p in module.named_parameters() if p.requires_grad and n in names}
    return {n.removeprefix("model."): p for n, p in module.named_parameters() if p.requires_grad}


def _local_shape(param: nn.Parameter) -> torch.Size:
    return param.ds_shape if hasattr(param, "ds_id") else param.shape


def _torch_optimizer(engine: Any) -> torch.optim.Optimizer:
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def _adam_owners(engine: Any) -> list[torch.Tensor]:
    """The tensors the torch optimizer keys its Adam state by (see the module docstring)."""
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        if hasattr(engine.optimizer, attr):
            return list(getattr(engine.optimizer, attr))
    return [p for group in _torch_optimizer(engine).param_groups for p in group["params"]]


def _zero(param: nn.Parameter) -> bool:
    """Whether DeepSpeed's ZeRO optimizer holds the master copy (ZeRO-3 or ZeRO-1/2 mapping)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _dp_whole(engine: Any, param: nn.Parameter, key: str) -> torch.Tensor:
    """`key` of one parameter, whole over DP (this TP rank's shard); collective over DP for ZeRO."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    shape = _local_shape(param)
    if _zero(param):
        if key == "param":
            return safe_get_full_fp32_param(param).reshape(shape).float().cpu()
        return safe_get_full_optimizer_state(param, key).reshape(shape).float().cpu()
    if key == "param":
        return param.detach().float().cpu().clone()
    state = _torch_optimizer(engine).state.get(param, {})
    return state[key].detach().float().cpu().clone() if key in state else torch.zeros(shape)


def _gathered(engine: Any, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layers' TP gather run over `values` ({plain name: local tensor}) instead of the weights.

    Each parameter's data is swapped for its value, `gather_full_state` runs (collective over
    the TP group), and the data is put back.
    """
    params = _trainable(engine)
    saved = {name: params[name].data for name in values}
    try:
        for name, value in values.items():
            params[name].data = value
        state = gather_full_state(engine.module, trainable_only=True)
    finally:
        for name, data in saved.items():
            params[name].data = data
    if _is_pipeline(engine):
        names = engine.module.flamingo_names
        return {names[k]: v for k, v in state.items() if k in names}
    return {k.removeprefix("model."): v for k, v in state.items()}


def _adam_step(engine: Any) -> int:
    opt = _torch_optimizer(engine)
    steps = [int(s["step"]) for s in opt.state.values() if "step" in s]
    return max(steps, default=0)


# ----------------------------------------------------------------------------- save


def save_layout_free(engine: Any, groups: ProcessGroups, checkpoint_dir: str | Path) -> None:
    """Write this stage's part of the layout-free state (collective: every rank calls it).

    Args:
        engine: the DeepSpeed engine (plain or pipeline, any ZeRO stage).
        groups: this rank's process groups.
        checkpoint_dir: the (staging) checkpoint directory.
    """
    params = _trainable(engine)
    _link_adam_state(engine, create=True)  # before the first step: Adam's zeros
    part: dict[str, dict[str, torch.Tensor]] = {name: {} for name in params}
    for key in KEYS:
        local = {name: _dp_whole(engine, p, key) for name, p in params.items()}
        for name, full in _gathered(engine, local).items():
            part[name][key] = full
    if groups.dp_rank == 0 and groups.tp_rank == 0:
        out = Path(checkpoint_dir) / DIR
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"format": FORMAT, "adam_step": _adam_step(engine), "params": part},
                   out / f"part_{groups.pp_rank:03d}.pt")


def read_layout_free(checkpoint_dir: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """({plain name: {"param", "exp_avg", "exp_avg_sq"}}, Adam step) from every part file.

    Raises:
        LayoutError: the checkpoint has no layout-free state (older format).
    """
    files = sorted((Path(checkpoint_dir) / DIR).glob("part_*.pt"))
    if not files:
        raise LayoutError(f"{checkpoint_dir}: no {DIR}/ state (written before layouts could "
                          f"change); resume it on the layout that wrote it")
    params, steps = {}, set()
    for path in files:
        part = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if part.get("format") != FORMAT:
            raise LayoutError(f"{path}: layout-free format {part.get('format')}, expected {FORMAT}")
        params.update(part["params"])
        steps.add(int(part["adam_step"]))
    return params, max(steps)


# ----------------------------------------------------------------------------- load


def _shard_index(engine: Any, groups: ProcessGroups) -> dict[str, tuple[torch.Size, torch.Tensor]]:
    """{plain name: (full shape, flat index into the full tensor of each local element)}."""
    probes = {}
    for name, param in _trainable(engine).items():
        shape = _local_shape(param)
        count = int(torch.Size(shape).numel())
        code = groups.tp_rank * _SHIFT + torch.arange(count, dtype=torch.float64)
        probes[name] = code.view(shape)
    index = {}
    for name, full in _gathered(engine, probes).items():
        flat = full.flatten()
        owner = torch.div(flat, _SHIFT, rounding_mode="floor")
        mine = (owner == groups.tp_rank).nonzero().squeeze(1)
        local = (flat[mine] - groups.tp_rank * _SHIFT).long()
        where = torch.empty(probes[name].numel(), dtype=torch.long)
        where[local] = mine
        index[name] = full.shape, where
    return index


def _link_adam_state(engine: Any, create: bool) -> None:
    """Make Adam's state reachable per parameter.

    With `create`, zero state (what AdamW starts from) is made where the optimizer has none yet.
    ZeRO-1/2 map each parameter to its fragment of the flat state only lazily; the mapping is
    (re)made here so that `safe_get/set_full_optimizer_state` find it.
    """
    opt = _torch_optimizer(engine)
    for owner in _adam_owners(engine):
        state = opt.state[owner]
        if create and not state:
            state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(owner),
                         exp_avg_sq=torch.zeros_like(owner))
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None and any(opt.state[owner] for owner in _adam_owners(engine)):
        engine.optimizer._hp_optimizer_states_linked = False
        link()


def _set_zero3(param: nn.Parameter, value: torch.Tensor, key: Optional[str]) -> None:
    """Write this DP rank's piece of a whole (TP-local) `value` into ZeRO-3's fp32 partition of
    `param` (key None) or its Adam state `key`.

    DeepSpeed 0.19's `safe_set_full_*` narrows the unpadded value at rank x partition size, which
    fails on the last ranks when dp does not divide the parameter's size (a (1,) gate at dp=2);
    this pads as the partitions are padded.
    """
    part, _ = param._z3_optimizer._get_fp32_opt_state_partition(
        param, release_swap_buffers=False, optim_state_key=key)
    start = part.numel() * dist.get_rank(group=param.ds_process_group)
    piece = value.flatten()[start:start + part.numel()]
    part.data.zero_()
    part.data[:piece.numel()].copy_(piece)


def _local_values(saved: dict, index: dict) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    for name, (shape, where) in index.items():
        if name not in saved:
            raise LayoutError(f"checkpoint lacks trainable parameter '{name}' (another model?)")
        entry = saved[name]
        if entry["param"].shape != shape:
            raise LayoutError(f"'{name}': checkpoint shape {tuple(entry['param'].shape)}, this "
                              f"model {tuple(shape)}")
        yield name, {key: entry[key].flatten()[where] for key in KEYS}


def load_layout_free(engine: Any, groups: ProcessGroups, checkpoint_dir: str | Path) -> int:
    """Load a layout-free state into an engine of any layout (collective: every rank calls it).

    Args:
        engine: a freshly built engine (no step taken).
        groups: this rank's process groups.
        checkpoint_dir: a checkpoint directory holding `layout_free/`.
    Returns:
        The Adam step restored.
    Raises:
        LayoutError: no layout-free state, or a parameter missing or shaped differently.
    """
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    saved, step = read_layout_free(checkpoint_dir)
    params = _trainable(engine)
    values = {name: {k: v.view(_local_shape(params[name])) for k, v in local.items()}
              for name, local in _local_values(saved, _shard_index(engine, groups))}
    _link_adam_state(engine, create=True)
    opt = _torch_optimizer(engine)
    zero3 = [p for p in params.values() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(zero3, modifier_rank=0, enabled=bool(zero3)):
        for name, param in params.items():
            with torch.no_grad():
                param.data.copy_(values[name]["param"].to(param.dtype))
    for name, param in params.items():
        if hasattr(param, "ds_id"):
            for key in KEYS:
                _set_zero3(param, values[name][key].to(param.device), None if key == "param" else key)
        elif _zero(param):
            safe_set_full_fp32_param(param, values[name]["param"].to(param.device))
            for key in KEYS[1:]:
                safe_set_full_optimizer_state(param, values[name][key].to(param.device), key)
        else:
            for key in KEYS[1:]:
                opt.state[param][key].copy_(values[name][key])
    for state in opt.state.values():
        state["step"] = torch.tensor(float(step), dtype=state["step"].dtype)
    dist.barrier()
    return step
