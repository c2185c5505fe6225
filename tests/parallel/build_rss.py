"""Peak resident memory of building one rank's model, measured in a fresh process.

    python -m tests.parallel.build_rss --lm DIR --tp 2 --pp 1 --rank 0 [--full | --training]

Prints one JSON line: {"peak_bytes": VmHWM after the build minus VmRSS before it, "params": ...}.
The peak is reset just before the build (`/proc/self/clear_refs` "5"), after every import and a
`malloc_trim` (so freed import memory cannot be reused unseen), so it measures the build alone.
The rank's place comes from a fake process group (no peers needed:
every collective is a no-op, which the memory of a build does not depend on). `--full` builds the
way training did before rank-local building: the whole fp32 model, then the TP plan applied;
`--training` through training's own entry (`training.engine.build_rank_local_model`: the
compute-balanced stages of the run config).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
from pathlib import Path


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def _full_model(cfg):
    """The model as training built it before rank-local building (fp32, every rank in full)."""
    from megaflamingo.models.flamingo import Flamingo, resolve_token_ids
    from megaflamingo.models.hf_weights import load_hf_lm
    from megaflamingo.models.towers import build_tower

    cfg = resolve_token_ids(cfg)
    ids = () if cfg.freeze_lm_embeddings else (cfg.media_token_id, cfg.eoc_token_id)
    lm = load_hf_lm(cfg.lm.hf_path, vocab_size=cfg.vocab_size, trainable_ids=ids)
    return Flamingo(build_tower(cfg.vision), lm, cfg)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lm", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--training", action="store_true")
    args = parser.parse_args()
    import open_clip  # noqa: F401  (imports before the measured window)
    import safetensors.torch  # noqa: F401
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megaflamingo.config import Config, ParallelConfig
    from megaflamingo.parallel.materialize import build_rank_model
    from megaflamingo.parallel.plan import apply_tensor_parallel
    from megaflamingo.parallel.topology import ParallelDims, build_groups
    from tests.parallel.test_materialize import lm_model_config, stage_parts

    if args.training:  # imports DeepSpeed: only when asked
        from megaflamingo.training.engine import build_rank_local_model

    dims = ParallelDims(tp=args.tp, pp=args.pp)
    dist.init_process_group("fake", store=FakeStore(), rank=args.rank, world_size=dims.world_size)
    groups = build_groups(dims)
    cfg = lm_model_config(args.lm)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed import memory back to the OS: not reusable
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    if args.full:  # the whole model, HF weights loaded over random ones, then the TP plan
        model = _full_model(cfg)
        if args.tp > 1:
            apply_tensor_parallel(model, groups)
    elif args.training:  # what training/loop.py calls: the run config's layout and seed
        model = build_rank_local_model(Config(model=cfg, parallel=ParallelConfig(tp=args.tp, pp=args.pp)), groups)
    else:
        parts = stage_parts(cfg, args.pp) if args.pp > 1 else None
        model, _ = build_rank_model(cfg, groups, parts)
    held = sum(p.numel() for p in model.parameters() if p.device.type != "meta")
    print(json.dumps({"peak_bytes": _status("VmHWM") - before, "before_bytes": before, "params": held,
                      "bytes": sum(p.numel() * p.element_size() for p in model.parameters()
                                   if p.device.type != "meta")}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
