"""`launcher/pretrain.py` on one rank, recording what the training path built (test_rank_local.py).

    MF_PROBE_DIR=DIR deepspeed --num_gpus 4 tests/integration/rank_local_probe.py --config C key=value ...

Two observing hooks go in before the launcher's `main` runs, then it runs unchanged:
- every `models.hf_slices.SliceReader` created is kept, so its `reads` (each (tensor, spans) read
  from the safetensors files) can be saved;
- `megaflamingo.builder.build_training_model`, what the launcher calls on every rank, is wrapped:
  the moment it returns (before the engine exists), DIR/rank<R>.pt gets this rank's model as it
  was built: every parameter's value, or "meta" where the rank holds none, its `rank_shard`, its
  process-group coordinates and the slices read.
"""

from __future__ import annotations

import dataclasses
import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _install_hooks(out: Path) -> None:
    import torch

    import megaflamingo.builder as builder
    from megaflamingo.models import hf_slices

    readers: list = []
    init = hf_slices.SliceReader.__init__

    def counted_init(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        readers.append(self)

    hf_slices.SliceReader.__init__ = counted_init
    build = builder.build_training_model

    def recorded_build(cfg, groups):
        model = build(cfg, groups)
        params = {n: "meta" if p.device.type == "meta" else p.detach().clone() for n, p in model.named_parameters()}
        shard = getattr(model, "rank_shard", None)
        torch.save({"params": params, "rank_shard": None if shard is None else dataclasses.asdict(shard),
                    "coords": {"rank": groups.rank, "tp_rank": groups.tp_rank, "pp_rank": groups.pp_rank},
                    "reads": [list(r.reads) for r in readers]}, out / f"rank{groups.rank}.pt")
        return model

    builder.build_training_model = recorded_build


if __name__ == "__main__":
    probe_dir = Path(os.environ["MF_PROBE_DIR"])
    probe_dir.mkdir(parents=True, exist_ok=True)
    _install_hooks(probe_dir)
    sys.argv[0] = str(ROOT / "launcher" / "pretrain.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
