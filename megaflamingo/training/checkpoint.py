"""Checkpoint directories: atomic commit, keep-last-K, and finding what to resume from.

Layout under `<output_dir>/checkpoints/`:

    step_00000040/      a complete checkpoint (DeepSpeed's files + one `extra_rank<r>.pt` per rank)
    .staging_00000050/  a save in progress; never read; removed by the next commit
    latest              the name of the newest complete checkpoint (written by rename: atomic)

Every rank writes into the staging directory; after a barrier rank 0 renames it to its final name
and rewrites `latest`. A process killed mid-save therefore leaves only a staging directory, and
`latest` keeps pointing at the last good checkpoint. Assumes a filesystem shared by all nodes (as
DeepSpeed's own checkpointing does).

A checkpoint resumes on any layout (`restore_run_state`): `extra_rank<r>.pt` records the layout
that wrote DeepSpeed's files and rank r's data position (one entry per canonical reader); on the
same layout DeepSpeed loads its own files, on another the trainer loads `layout_free/` (weights
and Adam moments under the plain model's names, training/layout_free.py) into its new engine and
merges every rank's data position. A resumed run only reads the source checkpoint; a kill before
its own next commit leaves `latest` on the source.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from megaflamingo.parallel.topology import ParallelDims, ProcessGroups

_FINAL = re.compile(r"^step_(\d{8})$")


def final_name(step: int) -> str:
    return f"step_{step:08d}"


def staging_name(step: int) -> str:
    return f".staging_{step:08d}"


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if p.is_dir() and (m := _FINAL.match(p.name))]
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The checkpoint `latest` names, else the newest complete one, else None."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if _FINAL.match(candidate.name) and candidate.is_dir():
            return candidate
    done = complete_checkpoints(root)
    return done[-1][1] if done else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def commit_checkpoint(root: str | Path, step: int, keep_last: int) -> Path:
    """Rank 0, after every rank finished writing the staging dir: make it the latest checkpoint.

    Args:
        root: the checkpoints directory.
        step: the step that was saved.
        keep_last: how many complete checkpoints to keep (>= 1); older ones are deleted.
    Returns:
        The final checkpoint directory.
    """
    root = Path(root)
    staging, final = root / staging_name(step), root / final_name(step)
    if final.exists():  # re-saving a step (e.g. a SIGTERM save right after a periodic one)
        shutil.rmtree(final)
    os.replace(staging, final)
    _write_atomic(root / "latest", final.name)
    for _, old in complete_checkpoints(root)[: -max(1, keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".staging_*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_trainable_weights(model, checkpoint_dir: str | Path) -> list[str]:
    """Load the trainable weights of a (non-pipeline) checkpoint into a single-process model.

    Frozen weights are not in checkpoints (they come from their sources); this fills in what
    trained. ZeRO-0/1/2 checkpoints hold the module's weights whole; ZeRO-3 ones are gathered
    with DeepSpeed's own zero_to_fp32 reader.

    Args:
        model: a `Flamingo` built from the run's model config.
        checkpoint_dir: a complete checkpoint directory (e.g. `latest_checkpoint(root)`).
    Returns:
        The names loaded.
    Raises:
        ValueError: a pipeline checkpoint, or a trainable parameter missing from the checkpoint.
    """
    import torch

    path = Path(checkpoint_dir)
    states = path / "mp_rank_00_model_states.pt"  # ZeRO-0/1/2; ZeRO-3 names it zero_pp_rank_0_mp_rank_00_...
    if states.is_file():
        module = torch.load(states, map_location="cpu", weights_only=False)["module"]
    elif (path / f"zero_pp_rank_0_{states.name}").is_file():
        module = {}
    else:
        raise ValueError(f"{path}: no {states.name} (pipeline checkpoints are not supported here; "
                         f"convert with the pipeline layout)")
    if not module:  # ZeRO-3: parameters live in the optimizer partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        module = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    state = {k.removeprefix("model."): v for k, v in module.items()}
    wanted = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n in wanted if n not in state]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks trainable parameter '{missing[0]}'")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in wanted:
            params[name].copy_(state[name])
    return wanted


# ----------------------------------------------------------------------------- any layout


def layout_of(zero_stage: int, dims: "ParallelDims") -> dict[str, int]:
    """What a checkpoint's DeepSpeed files are bound to: {tp, pp, dp, zero_stage}."""
    return {"tp": dims.tp, "pp": dims.pp, "dp": dims.dp, "zero_stage": zero_stage}


def restore_run_state(engine: Any, groups: "ProcessGroups", zero_stage: int, path: Path) -> dict:
    """Load checkpoint `path` into `engine` on this layout (collective: every rank calls it).

    DeepSpeed's own files when the layout that wrote them is this one (bit-exact), else the
    layout-free state, cut for this layout.

    Args:
        engine: the freshly built engine.
        groups: this rank's process groups.
        zero_stage: this run's ZeRO stage.
        path: a complete checkpoint directory.
    Returns:
        {"loader": a data state this rank loads, "counters": ..., "rng": ...}.
    Raises:
        LayoutError: the layout changed and the checkpoint has no layout-free state (one line).
    """
    import torch

    from megaflamingo.data.dealing import merge_states
    from megaflamingo.training.layout_free import load_layout_free

    now = layout_of(zero_stage, groups.dims)
    first = torch.load(path / "extra_rank0.pt", weights_only=False)
    own = path / f"extra_rank{groups.rank}.pt"
    if first.get("layout", now) == now and own.is_file():  # no "layout": written before layouts moved
        engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False,
                               load_optimizer_states=True, load_lr_scheduler_states=False)
        return torch.load(own, weights_only=False)
    load_layout_free(engine, groups, path)
    extras = [torch.load(f, weights_only=False) for f in sorted(path.glob("extra_rank*.pt"))]
    return {"loader": merge_states([e["loader"] for e in extras]), "counters": first["counters"],
            "rng": first["rng"]}
