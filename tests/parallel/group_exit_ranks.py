"""One rank of test_group_exit (run under torchrun): start torch.distributed the way a launcher
does, build a model (which imports transformers' modeling_utils, and torch.distributed.fsdp with
it), end as the launchers end, and write the native threads still alive to OUT/RANK.json.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/parallel/group_exit_ranks.py \
        eval|train OUT
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main() -> None:
    how, out = sys.argv[1], Path(sys.argv[2])
    if how == "eval":
        from megaflamingo.eval.suite import init_ranks

        init_ranks()
    else:
        from megaflamingo.training.engine import init_distributed_backend

        init_distributed_backend()
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, vocab_size=64))
    dist.all_reduce(torch.ones(1))
    dist.barrier()
    dist.destroy_process_group()
    threads = sorted(p.read_text().strip() for p in Path("/proc/self/task").glob("*/comm"))
    (out / f"{os.environ['RANK']}.json").write_text(json.dumps(threads))


if __name__ == "__main__":
    main()
