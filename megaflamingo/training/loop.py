"""The training job: distributed setup, the step loop, checkpoints with exact resume, preemption.

    run(cfg, build_model, resume="auto")    # what launcher/pretrain.py calls on every rank

The config is resolved once (`megaflamingo.resolve`: LM sizes, token ids, the layout) before any
process group starts. Then each rank builds only its own share of the model, after the process
groups exist (`training.engine.build_rank_local_model`: its pipeline stage's layers, its TP slices,
checkpoint slices read once; no rank ever holds the full model). Per optimizer step, every rank
takes its micro-batches from the data loader (both streams in the configured ratio) and runs them
through the one step function (`training.step`, plain or pipeline engine); rank 0 logs. Stream
loss multipliers are per-sample `loss_weight`s, rescaled here so that the step's loss is
sum_s multiplier_s * loss_s, OpenFlamingo's objective (reference §4.2), whatever the number of micro-batches: the engine
averages over the step's micro-batches, so a stream with k of the step's n micro-batches gets
weight multiplier * n / k.

The learning rate is set by the loop from the step number (`schedule.lr_multiplier`), so it needs
no state of its own in a checkpoint. A step with a NaN/Inf gradient on any rank is skipped on
every rank (see `training.step`) and counted; too many in a row abort the run.
"""

from __future__ import annotations

import os
import random
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from megaflamingo.config import Config, ConfigError, to_dict
from megaflamingo.parallel.topology import ProcessGroups, build_groups
from megaflamingo.resolve import resolve_config
from megaflamingo.training.checkpoint import (commit_checkpoint, latest_checkpoint, layout_of,
                                              restore_run_state, staging_name)
from megaflamingo.training.layout_free import save_layout_free
from megaflamingo.training.metrics import MetricsLogger
from megaflamingo.training.probe import build_probe, gate_metrics
from megaflamingo.training.run_state import Counters, Preemption, TrainingAborted, hold_for_test
from megaflamingo.training.schedule import lr_multiplier

__all__ = ["Counters", "Trainer", "TrainingAborted", "init_distributed", "run"]


# ----------------------------------------------------------------------------- setup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: Config) -> tuple[Config, ProcessGroups]:
    """Resolve the config for the launcher's world size, then start torch.distributed.

    Works under the deepspeed launcher, torchrun, or as a single plain process.
    Returns:
        (the resolved config, this rank's process groups).
    Raises:
        ConfigError: the config does not resolve or the layout does not fit (before any group starts).
    """
    cfg, dims = resolve_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if "RANK" not in os.environ:  # a plain `python launcher/pretrain.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    from megaflamingo.training.engine import init_distributed_backend

    init_distributed_backend()
    return cfg, build_groups(dims)


def build_training_engine(cfg: Config, groups: ProcessGroups, model: nn.Module, num_micro: int) -> Any:
    """The model in its DeepSpeed engine.

    Micro-batches of the two streams differ in size and shape; the engine only needs their count
    (`num_micro` per rank per step).
    """
    from megaflamingo.training.engine import build_engine

    return build_engine(cfg, model, groups, batch_size=num_micro * groups.dims.dp, micro_batch_size=1)


def build_logger(cfg: Config, groups: ProcessGroups, resumed: bool) -> MetricsLogger:
    """Rank 0's metrics logger (a no-op elsewhere); rank 0 also writes the resolved config.yaml."""
    out = Path(cfg.train.output_dir)
    logger = MetricsLogger(out, enabled=groups.rank == 0, tensorboard=cfg.logging.tensorboard,
                           wandb_project=cfg.logging.wandb_project, resume=resumed)
    if groups.rank == 0:
        import yaml

        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return logger


def build_progress(cfg: Config, groups: ProcessGroups, initial: int) -> Optional[Any]:
    """A live tqdm bar on rank 0 when stderr is a terminal (log lines are printed either way)."""
    if groups.rank != 0 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.train.steps, initial=initial, unit="step", dynamic_ncols=True)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _batch_stats(batch: dict) -> tuple[int, int, int]:
    """(samples, real tokens, real images) of one micro-batch; zero-padded images do not count."""
    images = batch["images"]
    real_images = int((images.flatten(3).abs().amax(dim=-1) > 0).sum())
    return images.shape[0], int(batch["attention_mask"].sum()), real_images


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """Everything one rank needs to train: model, engine, step function, data, logging, checkpoints.

    Args:
        cfg: the resolved run config (`resolve_config`; `init_distributed` returns it).
        groups: this rank's process groups.
        model: this rank's model of `cfg.model` (`training.engine.build_rank_local_model`), or a
            plain model with the same initial weights on every rank.
        resume: a checkpoint dir, "auto" (the latest under output_dir, if any) or None.
    Raises:
        ConfigError: no tokenizer, a data or checkpoint problem.
    """

    def __init__(self, cfg: Config, groups: ProcessGroups, model: nn.Module, resume: Optional[str] = "auto") -> None:
        from megaflamingo.data.loader import build_train_loader
        from megaflamingo.data.tokenizer import load_tokenizer
        from megaflamingo.training.engine import build_train_step

        if cfg.model.tokenizer is None:
            raise ConfigError("model.tokenizer: training needs a tokenizer directory")
        self.cfg, self.groups = cfg, groups
        self.ckpt_root = Path(cfg.train.output_dir) / "checkpoints"
        self.tokenizer, _ = load_tokenizer(cfg.model.tokenizer)
        self.loader = build_train_loader(cfg, self.tokenizer, groups.dp_rank, groups.dims.dp)
        self.probe = build_probe(cfg, self.tokenizer)  # None unless train.probe_every/probe_data
        self.order = list(self.loader.order)  # the stream of each micro-batch of a step
        self.per_step = dict(self.loader.per_step)  # micro-batches per step of each stream
        self.weight_scale = {name: len(self.order) / k for name, k in self.per_step.items()}
        self.engine = build_training_engine(cfg, groups, model, len(self.order))
        self.step_fn = build_train_step(self.engine, groups)
        self.device = self.engine.device
        self.base_lrs = [g["lr"] for g in self.engine.optimizer.param_groups]
        self.counters = Counters()
        self.logger = build_logger(cfg, groups, resumed=self._resume(resume))
        self.preemption = Preemption()
        self.progress = build_progress(cfg, groups, self.counters.step)

    # ------------------------------------------------------------------ checkpoints

    def _resume(self, resume: Optional[str]) -> bool:
        if resume is None:
            return False
        path = latest_checkpoint(self.ckpt_root) if resume == "auto" else Path(resume)
        if path is None:
            return False
        if not path.is_dir():
            raise ConfigError(f"checkpoint.resume: not a checkpoint directory: {path}")
        extra = torch.load(path / "extra_rank0.pt", weights_only=False)  # every layout has a rank 0
        saved, now = extra["model_config"], to_dict(self.cfg.model)
        if saved != now:
            diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            raise ConfigError(f"checkpoint {path} was written for a different model config "
                              f"(model.{', model.'.join(diff)} differ)")
        state = restore_run_state(self.engine, self.groups, self.cfg.parallel.zero_stage, path)
        self.loader.load_state_dict(state["loader"])  # on another layout: every rank's, merged
        self.counters = Counters(**state["counters"])
        _set_rng_state(state["rng"])
        return True

    def save(self) -> None:
        """Save a checkpoint of this step (collective; atomic: see `training.checkpoint`)."""
        step = self.counters.step
        tag = staging_name(step)
        self.engine.save_checkpoint(str(self.ckpt_root), tag=tag, save_latest=False,
                                    exclude_frozen_parameters=True)
        save_layout_free(self.engine, self.groups, self.ckpt_root / tag)  # resumable on any layout
        extra = {"loader": self.loader.state_dict(), "counters": asdict(self.counters),
                 "rng": _rng_state(), "model_config": to_dict(self.cfg.model),
                 "layout": layout_of(self.cfg.parallel.zero_stage, self.groups.dims)}
        torch.save(extra, self.ckpt_root / tag / f"extra_rank{self.groups.rank}.pt")
        dist.barrier()
        if self.groups.rank == 0:
            commit_checkpoint(self.ckpt_root, step, self.cfg.checkpoint.keep_last)
        dist.barrier()

    # ------------------------------------------------------------------ one step

    def _set_lr(self) -> float:
        o = self.cfg.optim
        mult = lr_multiplier(self.counters.step, o.schedule, o.warmup_steps, self.cfg.train.steps)
        for group, base in zip(self.engine.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * mult
        return self.base_lrs[0] * mult

    def _any_rank(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step; returns its metrics (the same on every rank) and whether it applied."""
        for name, batch in zip(self.order, micro_batches):
            batch["loss_weight"] = batch["loss_weight"] * self.weight_scale[name]
        lr = self._set_lr()
        out = self.step_fn(micro_batches, self.order)
        total = sum(getattr(self.cfg.data, n).loss_multiplier * v for n, v in out.stream_losses.items())
        return {"lr": lr, "applied": out.applied, "loss": total,
                **{f"loss_{n}": v for n, v in out.stream_losses.items()}}

    def _count(self, applied: bool) -> None:
        """Count a skipped step; too many in a row abort (no checkpoint of a diverging run)."""
        c, limit = self.counters, self.cfg.train.max_skipped_steps_in_a_row
        c.skipped_steps += not applied
        c.skipped_in_a_row = 0 if applied else c.skipped_in_a_row + 1
        if c.skipped_in_a_row > limit:
            raise TrainingAborted(f"{c.skipped_in_a_row} steps in a row had a NaN/Inf loss (step {c.step}; "
                                  f"train.max_skipped_steps_in_a_row={limit}); aborting without saving")

    # ------------------------------------------------------------------ the loop

    def train(self) -> int:
        """Run until train.steps (or a preemption signal); returns the process exit code."""
        cfg, c = self.cfg, self.counters
        batches, tick = iter(self.loader), time.perf_counter()
        while c.step < cfg.train.steps:
            micro_batches = next(batches)
            stats = torch.tensor([sum(x) for x in zip(*map(_batch_stats, micro_batches))], dtype=torch.float64,
                                 device=self.device)
            metrics = self.train_step(micro_batches)
            dist.all_reduce(stats, group=self.groups.dp)
            c.step += 1
            c.samples += int(stats[0])
            self._count(metrics.pop("applied"))
            if self.probe is not None and c.step % cfg.train.probe_every == 0:  # every rank (ZeRO-3/TP)
                metrics.update(self.probe(self.engine.module.model))
            elapsed, tick = time.perf_counter() - tick, time.perf_counter()
            self._report(metrics, stats, elapsed)
            hold_for_test(c.step, self.groups.rank, self.preemption)
            stop = self._any_rank(self.preemption.requested)
            if stop or (cfg.checkpoint.every and c.step % cfg.checkpoint.every == 0):
                self.save()
            if stop:
                return 0
        if cfg.checkpoint.every and cfg.train.steps % cfg.checkpoint.every:
            self.save()
        return 0

    def _report(self, metrics: dict, stats: torch.Tensor, elapsed: float) -> None:
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        step = self.counters.step
        if step % self.cfg.logging.every == 0 or step == self.cfg.train.steps:
            self._log(metrics, stats, elapsed)

    def _log(self, metrics: dict, stats: torch.Tensor, elapsed: float) -> None:
        samples, tokens, images = (float(x) for x in stats)
        norm = self.engine.get_global_grad_norm()
        record = {**metrics, **gate_metrics(self.engine.module), "grad_norm": float(norm) if norm is not None else None,
                  "samples_per_s": samples / elapsed, "tokens_per_s": tokens / elapsed,
                  "images_per_s": images / elapsed, "step_time_s": elapsed,
                  "skipped_steps": self.counters.skipped_steps, "skipped_samples": self.loader.skipped()}
        self.logger.log(self.counters.step, record)
        if self.groups.rank == 0:
            streams = " ".join(f"{k.removeprefix('loss_')} {v:.4f}" for k, v in metrics.items()
                               if k.startswith("loss_"))
            line = (f"step {self.counters.step}/{self.cfg.train.steps} loss {metrics['loss']:.4f} ({streams}) "
                    f"lr {metrics['lr']:.2e} {samples / elapsed:.1f} samples/s")
            if self.progress is not None:
                self.progress.write(line)
            else:
                print(line, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.logger.close()


def run(cfg: Config, build_model: Optional[Callable[[Config, ProcessGroups], nn.Module]] = None,
        resume: Optional[str] = "auto") -> int:
    """Train on this rank: resolve, start the groups, build this rank's model, set up, loop; always
    end with barrier + destroy_process_group.

    Args:
        cfg: the loaded config (resolved here).
        build_model: (resolved config, this rank's groups) -> this rank's model
            (`megaflamingo.builder.build_training_model`, which also imports an OpenFlamingo
            checkpoint: training itself never imports convert/); None:
            `training.engine.build_rank_local_model`.
        resume: a checkpoint dir, "auto" or None.
    """
    from megaflamingo.training.engine import build_rank_local_model

    cfg, groups = init_distributed(cfg)
    trainer = None
    try:
        torch.manual_seed(cfg.train.seed)  # the same random state on every rank
        trainer = Trainer(cfg, groups, (build_model or build_rank_local_model)(cfg, groups), resume)
        return trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
        dist.barrier()
        dist.destroy_process_group()
