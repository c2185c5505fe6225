"""destroy_process_group really ends the group on the launchers' paths: no gloo thread outlives it.

A group that outlives destroy_process_group keeps its gloo threads, and the process then aborts at
exit now and then (SIGABRT, "terminate called without an active exception") after a run that
finished: it failed launcher/evaluate.py's two-rank test about once in 30 runs. The cause is
importing torch.distributed.fsdp (transformers does, when a model is built) after the group
starts; `parallel.topology.import_before_process_group` imports it first. This test checks the
cause, which is deterministic, not the abort, which is not: without that import both paths
below keep three gloo threads alive on every rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("how", ["eval", "train"])
def test_no_gloo_thread_outlives_destroy_process_group(how, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests/parallel/group_exit_ranks.py"), how, str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        threads = json.loads((tmp_path / f"{rank}.json").read_text())
        assert threads and not [t for t in threads if "gloo" in t], (rank, threads)
