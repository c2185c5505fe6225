"""Two gloo ranks build a TP2 model rank-locally and compare it with the full model's TP2 slices,
the embedding's mean rows (a sum over both ranks' rows) included.

    python tests/parallel/materialize_ranks.py LM_DIR     # prints "rank ok" once per rank
"""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _run(rank: int, port: int, lm_dir: str) -> None:
    from megaflamingo.models.flamingo import build_model
    from megaflamingo.parallel.materialize import build_rank_model
    from megaflamingo.parallel.plan import apply_tensor_parallel
    from megaflamingo.parallel.topology import ParallelDims, build_groups, import_before_process_group
    from tests.parallel.test_materialize import lm_model_config

    import_before_process_group()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    groups = build_groups(ParallelDims(tp=2))
    cfg = lm_model_config(lm_dir)
    mine, _ = build_rank_model(cfg, groups)
    full = dict(apply_tensor_parallel(build_model(cfg), groups).named_parameters())
    for name in ("lm.embed_tokens.weight", "lm.lm_head.weight", "lm.embed_tokens.added"):
        got, want = dict(mine.named_parameters())[name], full[name]
        assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-6, atol=1e-7), name
    print("rank ok", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    mp.spawn(_run, args=(free, sys.argv[1]), nprocs=2)
