"""The training job: distributed setup, the step loop, checkpoints with exact resume, preemption.

    run(cfg, resume="auto")    # what launcher/pretrain.py calls on every rank

Per optimizer step, every rank takes its micro-batches from the data loader (both streams in the
configured ratio), runs them through the DeepSpeed engine (plain or pipeline), and rank 0 logs.
Stream loss multipliers are per-sample `loss_weight`s, rescaled here so that the step's loss is
sum_s multiplier_s * loss_s, OpenFlamingo's objective (reference §4.2), whatever the number of
micro-batches: the engine averages over the step's micro-batches, so a stream with k of the step's
n micro-batches gets weight multiplier * n / k.

The learning rate is set by the loop from the step number (`schedule.lr_multiplier`), so it needs
no state of its own in a checkpoint. A step whose loss is NaN/Inf on any rank is skipped on every
rank (the bad micro-batch backpropagates zero, the optimizer runs at lr 0 so no parameter moves)
and counted; too many in a row abort the run.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megaflamingo.config import Config, ConfigError, to_dict
from megaflamingo.parallel.topology import ProcessGroups, build_groups, check_layout
from megaflamingo.training.checkpoint import commit_checkpoint, latest_checkpoint, staging_name
from megaflamingo.training.metrics import MetricsLogger
from megaflamingo.training.schedule import lr_multiplier


@dataclass
class Counters:
    """What a resumed run must continue counting."""

    step: int = 0
    skipped_steps: int = 0
    skipped_in_a_row: int = 0
    samples: int = 0


class TrainingAborted(RuntimeError):
    """Too many NaN/Inf steps in a row (`train.max_skipped_steps_in_a_row`): every rank stops."""


class Preemption:
    """SIGTERM / SIGINT set a flag; the loop saves at the next step boundary and exits cleanly."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


# ----------------------------------------------------------------------------- setup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: Config) -> ProcessGroups:
    """Validate the layout for the launcher's world size, then start torch.distributed.

    Works under the deepspeed launcher, torchrun, or as a single plain process.
    Raises:
        ConfigError: the layout does not fit the world size or the model (before any group starts).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dims = check_layout(cfg, world)
    if "RANK" not in os.environ:  # a plain `python launcher/pretrain.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    import deepspeed

    from megaflamingo.training.engine import skip_shm_op_build

    skip_shm_op_build()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return build_groups(dims)


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


def _unweighted(loss: torch.Tensor, batch: dict) -> torch.Tensor:
    """A micro-batch's loss without its stream weight (the per-sample `loss_weight`, same for all)."""
    weight = float(batch["loss_weight"][0])
    return loss.float() / weight if weight else loss.float()


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """Everything one rank needs to train: model, engine, data, logging, checkpoints.

    Args:
        cfg: the validated run config.
        groups: this rank's process groups.
        resume: a checkpoint dir, "auto" (the latest under output_dir, if any) or None.
    """

    def __init__(self, cfg: Config, groups: ProcessGroups, resume: Optional[str] = "auto") -> None:
        from megaflamingo.data.loader import build_train_loader
        from megaflamingo.data.tokenizer import load_tokenizer
        from megaflamingo.models.flamingo import build_model
        from megaflamingo.training.engine import build_engine, is_pipeline

        if cfg.model.tokenizer is None:
            raise ConfigError("model.tokenizer: training needs a tokenizer directory")
        self.cfg, self.groups = cfg, groups
        self.out = Path(cfg.train.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.tokenizer, _ = load_tokenizer(cfg.model.tokenizer)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = build_model(cfg.model)
        self.loader = build_train_loader(cfg, self.tokenizer, groups.dp_rank, groups.dims.dp)
        self.order = list(self.loader.order)
        num_micro = len(self.order)
        self.per_step = dict(self.loader.per_step)  # micro-batches per step of each stream
        self.weight_scale = {name: num_micro / k for name, k in self.per_step.items()}
        # Micro-batches of the two streams differ in size and shape; the engine only needs their count.
        self.engine = build_engine(cfg, model, groups, batch_size=num_micro * groups.dims.dp, micro_batch_size=1)
        self.pipeline = is_pipeline(self.engine)
        self.device = self.engine.device
        if self.pipeline:
            from megaflamingo.training.engine import guard_pipeline_step

            guard_pipeline_step(self.engine)
        self.base_lrs = [g["lr"] for g in self.engine.optimizer.param_groups]
        self.counters = Counters()
        resumed = self._resume(resume)
        self.logger = MetricsLogger(self.out, enabled=groups.rank == 0, tensorboard=cfg.logging.tensorboard,
                                    wandb_project=cfg.logging.wandb_project, resume=resumed)
        if groups.rank == 0:
            import yaml

            (self.out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self.preemption = Preemption()
        self.progress = None
        if groups.rank == 0 and sys.stderr.isatty():  # a live bar on terminals; log lines either way
            from tqdm import tqdm

            self.progress = tqdm(total=cfg.train.steps, initial=self.counters.step, unit="step",
                                 dynamic_ncols=True)

    # ------------------------------------------------------------------ checkpoints

    def _resume(self, resume: Optional[str]) -> bool:
        if resume is None:
            return False
        path = latest_checkpoint(self.ckpt_root) if resume == "auto" else Path(resume)
        if path is None:
            return False
        if not path.is_dir():
            raise ConfigError(f"checkpoint.resume: not a checkpoint directory: {path}")
        extra = torch.load(path / f"extra_rank{self.groups.rank}.pt", weights_only=False)
        saved, now = extra["model_config"], to_dict(self.cfg.model)
        if saved != now:
            diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            raise ConfigError(f"checkpoint {path} was written for a different model config "
                              f"(model.{', model.'.join(diff)} differ)")
        self.engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False,
                                    load_optimizer_states=True, load_lr_scheduler_states=False)
        self.loader.load_state_dict(extra["loader"])
        self.counters = Counters(**extra["counters"])
        _set_rng_state(extra["rng"])
        return True

    def save(self) -> None:
        """Save a checkpoint of this step (collective; atomic: see `training.checkpoint`)."""
        step = self.counters.step
        tag = staging_name(step)
        self.engine.save_checkpoint(str(self.ckpt_root), tag=tag, save_latest=False,
                                    exclude_frozen_parameters=True)
        extra = {"loader": self.loader.state_dict(), "counters": asdict(self.counters),
                 "rng": _rng_state(), "model_config": to_dict(self.cfg.model)}
        torch.save(extra, self.ckpt_root / tag / f"extra_rank{self.groups.rank}.pt")
        dist.barrier()
        if self.groups.rank == 0:
            commit_checkpoint(self.ckpt_root, step, self.cfg.checkpoint.keep_last)
        dist.barrier()

    # ------------------------------------------------------------------ one step

    def _set_lr(self, scale: float) -> float:
        o = self.cfg.optim
        mult = scale * lr_multiplier(self.counters.step, o.schedule, o.warmup_steps, self.cfg.train.steps)
        for group, base in zip(self.engine.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * mult
        return self.base_lrs[0] * mult

    def _any_rank(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _zero_loss(self) -> torch.Tensor:
        """A finite loss with zero gradient for every trainable parameter (keeps hooks and
        gradient reduction on their normal path when a micro-batch's real loss is NaN/Inf)."""
        params = [p for p in self.engine.module.parameters() if p.requires_grad]
        return torch.stack([(p * 0).sum() for p in params]).sum()

    def _run_pipeline(self, micro_batches: list[dict]) -> dict[str, list]:
        """One pipeline schedule (forward, backward, optimizer step inside `train_batch`).

        Returns the last stage's per-micro-batch losses by stream (empty lists on other stages).
        A NaN/Inf step never moves parameters: ZeRO-1's optimizer skips steps whose gradient norm
        is not finite, and `guard_pipeline_step` does the same for ZeRO-0.
        """
        from megaflamingo.training.engine import pipeline_item

        loss_fn = self.engine.module.loss_fn
        loss_fn.recorded = recorded = []
        try:
            self.engine.train_batch(iter([pipeline_item(b) for b in micro_batches]))
        finally:
            loss_fn.recorded = None
        losses: dict[str, list] = {name: [] for name in self.weight_scale}
        for name, batch, loss in zip(self.order, micro_batches, recorded):
            losses[name].append(_unweighted(loss, batch))
        return losses

    def _run_micro_batches(self, micro_batches: list[dict]) -> tuple[dict[str, list], bool]:
        """Forward/backward every micro-batch (no pipeline); returns per-stream losses and badness.

        Once any rank sees a NaN/Inf loss, the rest of the step backpropagates zero and the
        optimizer runs at lr 0: no parameter moves (Adam's moments still see the step's finite
        micro-batches that came before the bad one).
        """
        losses: dict[str, list] = {name: [] for name in self.weight_scale}
        bad = False
        for name, batch in zip(self.order, micro_batches):
            loss = self.engine(**batch)
            bad = self._any_rank(not bool(torch.isfinite(loss.detach()).all())) or bad
            self.engine.backward(self._zero_loss() if bad else loss)
            losses[name].append(_unweighted(loss.detach(), batch))
            if bad and self.engine.is_gradient_accumulation_boundary():
                self._set_lr(0.0)
            self.engine.step()
        return losses, bad

    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step; returns the metrics of it (all ranks agree on `loss`)."""
        for name, batch in zip(self.order, micro_batches):
            batch["loss_weight"] = batch["loss_weight"] * self.weight_scale[name]
        lr = self._set_lr(1.0)
        if self.pipeline:
            losses, bad = self._run_pipeline(micro_batches), False
        else:
            losses, bad = self._run_micro_batches(micro_batches)
        # Per-stream means over the step's micro-batches and DP ranks; with pipeline stages only the
        # last stage holds losses, so the sums are reduced over the pipeline group too.
        names = list(losses)
        sums = torch.zeros(len(names), dtype=torch.float64, device=self.device)
        for i, name in enumerate(names):
            if losses[name]:
                sums[i] = torch.stack(losses[name]).double().sum()
        dist.all_reduce(sums, group=self.groups.pp)
        dist.all_reduce(sums, group=self.groups.dp)
        per_stream = {name: float(sums[i]) / (self.per_step[name] * self.groups.dims.dp)
                      for i, name in enumerate(names)}
        total = sum(getattr(self.cfg.data, n).loss_multiplier * v for n, v in per_stream.items())
        bad = bad or not torch.isfinite(torch.tensor(total)).item()
        return {"lr": lr, "bad": bad, "loss": total, **{f"loss_{n}": v for n, v in per_stream.items()}}

    # ------------------------------------------------------------------ the loop

    def train(self) -> int:
        """Run until train.steps (or a preemption signal); returns the process exit code."""
        cfg, c = self.cfg, self.counters
        batches = iter(self.loader)
        tick = time.perf_counter()
        while c.step < cfg.train.steps:
            micro_batches = next(batches)
            stats = torch.tensor([sum(x) for x in zip(*map(_batch_stats, micro_batches))], dtype=torch.float64,
                                 device=self.device)
            metrics = self.train_step(micro_batches)
            dist.all_reduce(stats, group=self.groups.dp)
            c.step += 1
            if metrics.pop("bad"):
                c.skipped_steps += 1
                c.skipped_in_a_row += 1
                if c.skipped_in_a_row > cfg.train.max_skipped_steps_in_a_row:
                    raise TrainingAborted(f"{c.skipped_in_a_row} steps in a row had a NaN/Inf loss (step "
                                          f"{c.step}; train.max_skipped_steps_in_a_row="
                                          f"{cfg.train.max_skipped_steps_in_a_row}); aborting without saving")
            else:
                c.skipped_in_a_row = 0
            c.samples += int(stats[0])
            elapsed, tick = time.perf_counter() - tick, time.perf_counter()
            if self.progress is not None:
                self.progress.update(1)
                self.progress.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
            if c.step % cfg.logging.every == 0 or c.step == cfg.train.steps:
                self._log(metrics, stats, elapsed)
            stop = self._any_rank(self.preemption.requested)
            if stop or (cfg.checkpoint.every and c.step % cfg.checkpoint.every == 0):
                self.save()
            if stop:
                return 0
        if cfg.checkpoint.every and cfg.train.steps % cfg.checkpoint.every:
            self.save()
        return 0

    def _log(self, metrics: dict, stats: torch.Tensor, elapsed: float) -> None:
        samples, tokens, images = (float(x) for x in stats)
        norm = self.engine.get_global_grad_norm()
        record = {**metrics, "grad_norm": float(norm) if norm is not None else None,
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


def run(cfg: Config, resume: Optional[str] = "auto") -> int:
    """Train on this rank: set up, loop, and always end with barrier + destroy_process_group."""
    groups = init_distributed(cfg)
    trainer = None
    try:
        trainer = Trainer(cfg, groups, resume)
        return trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
        dist.barrier()
        dist.destroy_process_group()
