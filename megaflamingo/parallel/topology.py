"""The 3D layout: `ParallelDims` (pure rank arithmetic) and the process groups built from it.

Axis order is (pp, dp, tp) with tp innermost, so the ranks of one tensor-parallel group are
consecutive and stay inside a node; this is also the order of DeepSpeed's
`PipeModelDataParallelTopology` (axes pipe, data, model). Groups are built once and passed
explicitly; nothing here is a module-level global. Whether a layout fits a config is
`megaflamingo.resolve.check_layout`'s question.
"""

from __future__ import annotations

from dataclasses import dataclass
from megaflamingo.config import ConfigError

AXES = ("pp", "dp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the three axes. world_size = pp * dp * tp."""

    tp: int = 1
    pp: int = 1
    dp: int = 1

    def __post_init__(self) -> None:
        for axis in AXES:
            if getattr(self, axis) < 1:
                raise ConfigError(f"parallel: {axis} must be >= 1, got {getattr(self, axis)}")

    @classmethod
    def from_world(cls, world_size: int, tp: int = 1, pp: int = 1) -> "ParallelDims":
        """dp is what is left of the world once tp and pp are placed."""
        if world_size % (tp * pp) != 0:
            raise ConfigError(
                f"parallel: tp*pp = {tp}*{pp} = {tp * pp} does not divide the world size {world_size}"
            )
        return cls(tp=tp, pp=pp, dp=world_size // (tp * pp))

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def coords(self, rank: int) -> dict[str, int]:
        """{"pp": i, "dp": j, "tp": k} of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        return {"pp": rank // (self.dp * self.tp), "dp": (rank // self.tp) % self.dp, "tp": rank % self.tp}

    def rank(self, pp: int = 0, dp: int = 0, tp: int = 0) -> int:
        """Global rank of a coordinate."""
        return (pp * self.dp + dp) * self.tp + tp

    def groups(self, axis: str) -> list[list[int]]:
        """Every group along `axis`: the ranks that differ only in that coordinate."""
        if axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {axis}")
        others = [a for a in AXES if a != axis]
        out = []
        for i in range(getattr(self, others[0])):
            for j in range(getattr(self, others[1])):
                fixed = {others[0]: i, others[1]: j}
                out.append([self.rank(**fixed, **{axis: k}) for k in range(getattr(self, axis))])
        return out

    def group_of(self, rank: int, axis: str) -> list[int]:
        """The ranks of `rank`'s group along `axis`."""
        return next(g for g in self.groups(axis) if rank in g)


@dataclass
class ProcessGroups:
    """This rank's coordinates and its three process groups."""

    dims: ParallelDims
    rank: int
    tp_rank: int
    dp_rank: int
    pp_rank: int
    tp: object
    dp: object
    pp: object


def import_before_process_group() -> None:
    """Import torch.distributed.fsdp, which must come before torch.distributed starts.

    Imported after init_process_group (transformers' modeling_utils imports it when a model is
    built), it takes ten references to the default group that destroy_process_group does not
    drop (torch 2.14). The group's gloo threads then outlive it, and now and then the process
    aborts at exit ("terminate called without an active exception", SIGABRT) after a run that
    finished. Every place that starts torch.distributed calls this first.
    """
    import torch.distributed.fsdp  # noqa: F401


def build_groups(dims: ParallelDims) -> ProcessGroups:
    """Create every group of every axis (collectively, on all ranks) and keep this rank's.

    torch.distributed must already be initialised with world size dims.world_size. Size-1 groups
    are real groups too: DeepSpeed runs its collectives on whatever group it is handed.
    """
    import torch.distributed as dist

    rank = dist.get_rank()
    if dist.get_world_size() != dims.world_size:
        raise ConfigError(f"parallel: layout {dims} needs {dims.world_size} ranks, "
                          f"the world has {dist.get_world_size()}")
    mine = {}
    for axis in AXES:
        for ranks in dims.groups(axis):
            group = dist.new_group(ranks)
            if rank in ranks:
                mine[axis] = group
    c = dims.coords(rank)
    return ProcessGroups(dims, rank, c["tp"], c["dp"], c["pp"], mine["tp"], mine["dp"], mine["pp"])


class DeepSpeedMPU:
    """The `mpu` object DeepSpeed's engine queries for model- and data-parallel groups (no pipeline)."""

    def __init__(self, groups: ProcessGroups) -> None:
        self._g = groups

    def get_model_parallel_rank(self) -> int:
        return self._g.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self._g.dims.tp

    def get_model_parallel_group(self):
        return self._g.tp

    def get_data_parallel_rank(self) -> int:
        return self._g.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self._g.dims.dp

    def get_data_parallel_group(self):
        return self._g.dp

    # DeepSpeed also asks for these names in some code paths.
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group


def deepspeed_topology(dims: ParallelDims):
    """DeepSpeed's topology object for the same layout (axes pipe, data, model)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    return PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)
