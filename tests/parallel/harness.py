"""Run a function on N gloo ranks on the CPU and bring back what each rank returns.

    results = run_ranks(fn, world_size, *args)   # fn(rank, world_size, *args) -> picklable

Each rank is a fresh process (forked from a preloaded fork server) with the launcher's environment (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_SIZE, MASTER_ADDR/PORT), one OMP thread, DeepSpeed's shm-op JIT build skipped,
and torch.distributed initialised on gloo. Starting ranks and building engines costs seconds on
2 cores, so put many checks in one `fn`. Every rank that finishes ends with barrier() +
destroy_process_group() (gloo aborts ~40% of exits otherwise). A rank that raises writes its
traceback and exits; the others are then stopped and `run_ranks` raises with the traceback(s).
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "MASTER_ADDR": "127.0.0.1"}


PRELOAD = ("torch", "deepspeed", "open_clip", "megaflamingo.models.flamingo", "megaflamingo.training.engine",
           "megaflamingo.parallel.pipeline", "tests.parallel.cases",
           # imported lazily by deepspeed.initialize; the Muon module torch.compile()s at import,
           # which pulls in torch._inductor (~6 s of CPU per rank)
           "deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.runtime.zero.stage3",
           "deepspeed.runtime.pipe.engine")


class RankFailure(RuntimeError):
    """One or more ranks raised; the message holds their tracebacks."""


def _context():
    """A forkserver that imported torch, DeepSpeed, open_clip and our package once.

    Ranks fork from it, so each run pays no import cost (~10 s of CPU per rank otherwise, and the
    box has 2 cores). The server is a clean single-threaded process, unlike the pytest process,
    which may have run torch ops (forking that is unsafe). It starts once per session.
    """
    os.environ.update(ENV)  # inherited by the server and every rank
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    return ctx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world_size: int, port: int, timeout_s: float) -> None:
    os.environ.update(ENV, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_SIZE=str(world_size), MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from megaflamingo.parallel.topology import import_before_process_group
    from megaflamingo.training.engine import skip_shm_op_build

    skip_shm_op_build()
    import deepspeed
    import deepspeed.utils

    deepspeed.utils.logger.setLevel("WARNING")
    import_before_process_group()
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size,
                                         timeout=datetime.timedelta(seconds=timeout_s))
    deepspeed.init_distributed(dist_backend="gloo")


def _worker(fn: Callable, rank: int, world_size: int, port: int, out_dir: str, deadline: float,
            args: tuple) -> None:
    import torch.distributed as dist

    out = Path(out_dir)
    stacks = open(out / f"{rank}.stack", "w")  # where each rank is, should the run hang
    timeout_s = deadline - time.time()  # the spawn itself (imports) has used some already
    faulthandler.dump_traceback_later(max(1.0, timeout_s - 8), file=stacks)
    try:
        _init(rank, world_size, port, timeout_s)
        result = fn(rank, world_size, *args)
        torch.save(result, out / f"{rank}.pt")
    except BaseException:
        (out / f"{rank}.err").write_text(traceback.format_exc())
        os._exit(1)  # peers may be blocked in a collective: no barrier, no clean-up
    dist.barrier()
    dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()


def _failures(out: Path, world_size: int, timed_out: bool) -> str:
    texts = [f"--- rank {r} ---\n{(out / f'{r}.err').read_text()}" for r in range(world_size)
             if (out / f"{r}.err").exists()]
    if timed_out:  # the stacks faulthandler dumped shortly before the deadline
        texts += [f"--- rank {r} stack at timeout ---\n{_tail(out / f'{r}.stack')}" for r in range(world_size)]
    return "\n".join(texts)


def _tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text().splitlines()[:lines]) if path.exists() else "(none)"


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 420.0) -> list[Any]:
    """Spawn `world_size` ranks running fn(rank, world_size, *args); return their results by rank.

    Args:
        fn: a module-level (picklable) function.
        world_size: number of ranks.
        args: picklable arguments passed to every rank.
        timeout_s: wall-clock limit for the whole run (also the gloo collective timeout).
    Raises:
        RankFailure: a rank raised (its traceback is in the message), died, or the run timed out.
    """
    ctx = _context()
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="mf-ranks-") as tmp:
        out = Path(tmp)
        deadline = time.time() + timeout_s
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, tmp, deadline, args), daemon=False)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        _wait(procs, out, world_size, timeout_s)
        return [torch.load(out / f"{r}.pt", weights_only=False) for r in range(world_size)]


def _wait(procs: list, out: Path, world_size: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    failed_at = None
    while any(p.is_alive() for p in procs):
        if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
            failed_at = time.monotonic()  # give peers a moment to report their own errors
        if time.monotonic() > deadline or (failed_at is not None and time.monotonic() - failed_at > 5):
            break
        time.sleep(0.2)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    for p in procs:
        p.join()
    timed_out = time.monotonic() > deadline
    errors = _failures(out, world_size, timed_out)
    if errors or alive or any(p.exitcode != 0 for p in procs):
        codes = {r: p.exitcode for r, p in enumerate(procs)}
        why = "timed out" if timed_out else "failed"
        raise RankFailure(f"distributed run {why} (exit codes {codes})\n{errors}")
