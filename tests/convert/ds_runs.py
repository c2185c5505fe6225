"""What each gloo rank runs for the consolidation tests: train, save a DeepSpeed checkpoint the way
the training loop does (trainable state only), and return the state gathered in memory.

Runs under `tests.parallel.harness.run_ranks`; the models, batch and optimizer are those of the
parallel parity tests (`tests.parallel.cases`).
"""

from __future__ import annotations

from pathlib import Path

import torch

STEPS = 2


def save_and_gather(rank: int, world_size: int, family: str, tp: int, pp: int, zero: int,
                    out_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """Train STEPS steps on (tp, pp, zero), save `out_dir/tag`, return this rank's gathered state.

    With pipeline stages each rank returns its own stage's parameters; the caller takes the union.
    """
    from megaflamingo.parallel.topology import ParallelDims, build_groups
    from megaflamingo.training.engine import build_engine, gather_trainable_state, split_batch, train_step
    from tests.parallel.cases import GLOBAL_BATCH, MICRO_BATCH, build_tiny_model, global_batch, run_config

    dims = ParallelDims.from_world(world_size, tp=tp, pp=pp)
    groups = build_groups(dims)
    cfg = run_config(family, tp=tp, pp=pp, zero=zero)
    engine = build_engine(cfg, build_tiny_model(family), groups, batch_size=GLOBAL_BATCH,
                          micro_batch_size=MICRO_BATCH,
                          ds_overrides={"zero_optimization": {"stage": zero,
                                                              "stage3_param_persistence_threshold": 0}})
    batch = global_batch()
    for _ in range(STEPS):
        train_step(engine, split_batch(batch, engine, groups), groups)
    # As training/loop.py saves: DeepSpeed's files of the trainable state only.
    engine.save_checkpoint(str(Path(out_dir)), tag=tag, save_latest=False, exclude_frozen_parameters=True)
    state = {k: v.detach().clone() for k, v in gather_trainable_state(engine).items()}
    engine.destroy()
    return state
