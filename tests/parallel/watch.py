"""Watch what a rank materialises while it builds its model, and say what it should not have.

    with BuildWatch() as watch:
        model = build(...)
    problems = watch.problems(held_params, full_shapes_of_tp_sharded_params)

Two records, both independent of how the model is built:
- every nn.Parameter created with real (non-meta) data, and its size;
- the shape of every CPU tensor an operator wrote (a TorchDispatchMode; allocations without
  values, `empty` / `empty_strided`, and views do not count).
A rank-local build creates each parameter it holds once, at its local size, and never writes a
tensor of the full shape of a tensor-parallel weight matrix. Building the full model first (the old
path) breaks both: see `old_path_problems`, which the tests require to be non-empty.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

_NO_VALUES = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default}


class _Writes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func not in _NO_VALUES and not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    self.shapes.add(tuple(t.shape))
        return out


class BuildWatch:
    """Context manager recording real parameters created and tensor shapes written (module docstring)."""

    def __enter__(self) -> "BuildWatch":
        self.created: list[int] = []
        self._new = nn.Parameter.__dict__["__new__"]
        created, new = self.created, self._new

        def counted(cls, data=None, requires_grad=True):
            if data is not None and data.device.type != "meta":
                created.append(data.numel())
            return new.__func__(cls, data, requires_grad)

        nn.Parameter.__new__ = staticmethod(counted)
        self._writes = _Writes().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._writes.__exit__(*exc)
        nn.Parameter.__new__ = self._new

    def problems(self, held: list[torch.Tensor], tp_full_shapes: set[tuple[int, ...]]) -> list[str]:
        """What the build materialised beyond the rank's share.

        Args:
            held: the parameters the rank holds after the build (its stage, its shards).
            tp_full_shapes: full shapes of the TP-sharded parameters (empty without TP).
        Returns:
            One line per problem; empty when the build made only what the rank holds.
        """
        out = []
        held_numel = sum(p.numel() for p in held)
        if sum(self.created) != held_numel or len(self.created) != len(held):
            out.append(f"created {len(self.created)} real parameters of {sum(self.created)} elements; "
                       f"the rank holds {len(held)} of {held_numel}")
        # matrices only: a column shard's init draws one full row at a time (its 1-D shape can be
        # a sharded bias's full shape), and nothing 1-D is large
        forbidden = {s for s in tp_full_shapes if len(s) >= 2} - {tuple(p.shape) for p in held}
        out += [f"wrote a tensor of the full shape {s} of a TP-sharded parameter" for s in
                sorted(forbidden & self._writes.shapes)]
        return out


def tp_full_shapes(model_cfg, tp: int) -> set[tuple[int, ...]]:
    """Full shapes of the parameters the TP plan shards (built on the meta device)."""
    from megaflamingo.models.flamingo import construct_model
    from megaflamingo.models.materialize import params_on_meta
    from megaflamingo.parallel.materialize import tp_styles

    if tp == 1:
        return set()
    with params_on_meta():
        meta = construct_model(model_cfg)
    styles = tp_styles(meta)
    return {tuple(p.shape) for n, p in meta.named_parameters() if styles.get(n) is not None}


def held_parameters(module: nn.Module) -> list[torch.Tensor]:
    """The real parameters of a rank's engine module, pipeline anchors left out."""
    return [p for n, p in module.named_parameters() if p.device.type != "meta" and "anchors" not in n]
