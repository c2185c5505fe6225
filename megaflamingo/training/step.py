"""One optimizer step on a DeepSpeed engine: what training runs, the parity tests check and the benchmark times.

    step = build_train_step(engine, groups)            # training/engine.py: picks plain or pipeline once
    out = step(micro_batches, streams)                 # StepOutput(loss, stream_losses, applied)

A step takes this rank's micro-batches of one global batch. Without pipeline stages each goes
through forward / backward / `engine.step()` (the engine steps the optimizer at its accumulation
boundary); with stages `engine.train_batch` runs DeepSpeed's schedule, optimizer step included.
Clipping is DeepSpeed's (`gradient_clipping`, always written from `optim.grad_clip`).

NaN/Inf policy, one mechanism for every engine kind and ZeRO stage: the optimizer DeepSpeed steps
checks the step's gradients for non-finite values over the whole world and, if any rank has one,
skips the update on every rank (parameters and Adam moments untouched) and says so in its
`overflow` attribute, the flag DeepSpeed reads after every optimizer step; the step reports
`engine.was_step_applied()`. DeepSpeed's own optimizer wrappers (ZeRO-1/2/3, the bf16 ones) do
that check themselves on the global gradient norm; where DeepSpeed steps a bare torch optimizer
(fp32 without ZeRO, pipeline stages included) that optimizer is `SkipNonFiniteAdamW`. A
micro-batch with a NaN loss simply backpropagates its NaN gradients.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from megaflamingo.parallel.topology import ProcessGroups

Batch = dict[str, torch.Tensor]


class SkipNonFiniteAdamW(torch.optim.AdamW):
    """AdamW whose `step` does nothing, on every rank, when any rank holds a NaN/Inf gradient.

    Collective while `active`: every rank must call `step` once per optimizer step, which is how
    DeepSpeed drives a bare torch optimizer (`build_engine` turns it off when DeepSpeed wraps it
    in an optimizer of its own, which then calls it once per parameter group and does the check).

    Args:
        params: parameters or parameter groups, as for `torch.optim.AdamW`.
        group: the process group that agrees on skipping; None: the whole world.
        **kwargs: AdamW's options (lr, betas, eps, weight_decay).
    """

    def __init__(self, params: Iterable[Any], group: Optional[dist.ProcessGroup] = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.group = group
        self.active = True
        self.overflow = False
        """True after a skipped step (DeepSpeed's attribute name: it then reports no applied step)."""

    def _any_rank_non_finite(self) -> bool:
        params = [p for g in self.param_groups for p in g["params"]]
        # Any NaN/Inf element makes a gradient's sum NaN/Inf, so all-finite sums prove all-finite
        # gradients (one fast reduction each instead of isfinite(g).all()'s four passes); a
        # non-finite sum may also come from finite values overflowing, so those are checked exactly.
        grads = [p.grad for p in params if p.grad is not None]
        bad = torch.zeros(1, device=params[0].device if params else None)  # NCCL reduces device tensors
        if grads:
            sums = torch.stack([g.sum() for g in grads])
            if not bool(sums.isfinite().all()):
                suspects = torch.nonzero(~sums.isfinite())[:, 0].tolist()
                bad = torch.stack([~torch.isfinite(grads[i]).all() for i in suspects]).any().float().reshape(1)
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.group)
        return bool(bad.item())

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """AdamW's step, or nothing (`overflow` set) when a gradient anywhere is NaN/Inf."""
        self.overflow = self.active and self._any_rank_non_finite()
        if self.overflow:
            return None
        return super().step(closure)


def pipeline_item(batch: Batch) -> tuple:
    """A micro-batch in PipelineEngine's format: ((images, input_ids, mask), (labels, loss_weight))."""
    return ((batch["images"], batch["input_ids"], batch["attention_mask"]),
            (batch["labels"], batch["loss_weight"]))


def _unweighted(loss: torch.Tensor, batch: Batch) -> torch.Tensor:
    """A micro-batch's loss without its stream weight (the per-sample `loss_weight`, same for all)."""
    weight = float(batch["loss_weight"][0])
    return loss.detach().float() / weight if weight else loss.detach().float()


@dataclass
class PhaseTimer:
    """Seconds per phase of the steps it watches, each phase between device syncs (benchmarks).

    Without pipeline stages the phases are forward, backward and optimizer (`engine.step`); a
    pipeline schedule interleaves them, so it is one phase, step.
    """

    device: torch.device
    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        yield
        sync()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


@dataclass
class StepOutput:
    """What one optimizer step reports (the same on every rank)."""

    loss: float
    """The weighted loss of the global batch: mean over the step's micro-batches and DP ranks."""
    stream_losses: dict[str, float]
    """Per stream: the unweighted loss, mean over that stream's micro-batches and DP ranks."""
    applied: bool
    """False: a NaN/Inf gradient somewhere; no parameter and no optimizer state moved."""


class TrainStep:
    """The step function of one engine; built once by `training.engine.build_train_step`.

    Args:
        engine: a DeepSpeedEngine or PipelineEngine from `build_engine`.
        groups: this rank's process groups (the layout the engine was built on).
        pipeline: whether `engine` is a PipelineEngine.
    """

    def __init__(self, engine: Any, groups: ProcessGroups, pipeline: bool) -> None:
        self.engine, self.groups, self.pipeline = engine, groups, pipeline
        self._run = self._run_pipeline if pipeline else self._run_plain
        self.timer: Optional[PhaseTimer] = None
        """Set by a benchmark to time the phases of the next steps; None: no syncs, no timing."""

    def _phase(self, name: str) -> contextlib.AbstractContextManager:
        return self.timer(name) if self.timer is not None else contextlib.nullcontext()

    def __call__(self, micro_batches: Sequence[Batch], streams: Optional[Sequence[str]] = None) -> StepOutput:
        """One optimizer step over this rank's micro-batches.

        Args:
            micro_batches: this rank's share of the global batch, `gradient_accumulation_steps`
                of them, each {images (B, M, 1, C, S, S), input_ids (B, T), attention_mask (B, T),
                labels (B, T), loss_weight (B,)}.
            streams: the data stream of each micro-batch (same on every rank); None: one stream "all".
        Returns:
            The step's `StepOutput`.
        Raises:
            ValueError: a number of micro-batches other than the engine's accumulation steps.
        """
        expected = self.engine.gradient_accumulation_steps()
        if len(micro_batches) != expected:
            raise ValueError(f"expected {expected} micro-batches, got {len(micro_batches)}")
        streams = list(streams) if streams is not None else ["all"] * len(micro_batches)
        loss, unweighted = self._run(micro_batches)
        return StepOutput(loss, self._stream_means(streams, unweighted), bool(self.engine.was_step_applied()))

    def _run_plain(self, micro_batches: Sequence[Batch]) -> tuple[float, list[torch.Tensor]]:
        """Forward / backward / step per micro-batch; (global-batch loss, unweighted losses)."""
        losses, unweighted = [], []
        for batch in micro_batches:
            with self._phase("forward"):
                loss = self.engine(**batch)
            with self._phase("backward"):
                self.engine.backward(loss)
            with self._phase("optimizer"):
                self.engine.step()
            losses.append(loss.detach().float())
            unweighted.append(_unweighted(loss, batch))
        mean = torch.stack(losses).mean()
        dist.all_reduce(mean, group=self.groups.dp)
        return float(mean) / self.groups.dims.dp, unweighted

    def _run_pipeline(self, micro_batches: Sequence[Batch]) -> tuple[float, list[torch.Tensor]]:
        """One pipeline schedule; the last stage's unweighted losses (empty on other stages)."""
        loss_fn = self.engine.module.loss_fn
        loss_fn.recorded = recorded = []
        try:
            with self._phase("step"):
                loss = float(self.engine.train_batch(iter([pipeline_item(b) for b in micro_batches])))
        finally:
            loss_fn.recorded = None
        return loss, [_unweighted(l, b) for l, b in zip(recorded, micro_batches)]

    def _stream_means(self, streams: list[str], unweighted: list[torch.Tensor]) -> dict[str, float]:
        """Per-stream means over micro-batches and DP ranks (summed over pipeline stages: only the
        last one holds losses)."""
        names = list(dict.fromkeys(streams))
        sums = torch.zeros(len(names), dtype=torch.float64, device=self.engine.device)
        for name, loss in zip(streams, unweighted):
            sums[names.index(name)] += loss.double()
        if self.pipeline:
            dist.all_reduce(sums, group=self.groups.pp)
        dist.all_reduce(sums, group=self.groups.dp)
        return {name: float(sums[i]) / (streams.count(name) * self.groups.dims.dp) for i, name in enumerate(names)}
