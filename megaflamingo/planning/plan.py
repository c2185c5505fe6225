"""A run's memory and compute plan, per rank and per pipeline stage, without allocating weights.

    cfg, notes = load_plan_config("configs/llama3-70b-3d.yaml")
    plan = build_plan(cfg, world_size=64, gpu_mem=80 * GiB, notes=notes)
    print(format_plan(plan)); check_fits(plan)     # PlanError when a rank does not fit

Per rank, in bytes (w = 2 under bf16, 4 under fp32; Psi_f / Psi_t frozen / trainable elements the
rank holds after pipeline and tensor-parallel sharding, `params.rank_params`):

| term              | ZeRO 0        | ZeRO 1          | ZeRO 2          | ZeRO 3                     |
|-------------------|---------------|-----------------|-----------------|----------------------------|
| frozen weights    | w Psi_f       | w Psi_f         | w Psi_f         | w Psi_f / dp + gather      |
| trainable weights | w Psi_t       | w Psi_t         | w Psi_t         | w Psi_t / dp               |
| gradients         | w Psi_t       | w Psi_t         | w Psi_t / dp    | w Psi_t / dp               |
| optimizer (AdamW) | k Psi_t       | k Psi_t / dp    | k Psi_t / dp    | k Psi_t / dp               |

k = 12 under bf16 (fp32 master copy, exp_avg, exp_avg_sq), 8 under fp32 (the two moments); the
ZeRO-3 gather buffer holds the rank's largest pipeline layer in full. Activations: the saved
tensors of one micro-batch (`activations`) times the micro-batches in flight (1 without pipeline
stages; min(pp - stage, micro-batches) under DeepSpeed's 1F1B schedule), plus the largest transient.
Peak = the sum; CUDA context, communication buffers and allocator fragmentation come on top.
Pipeline bubble = (pp - 1) / (m + pp - 1) for m micro-batches per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megaflamingo.config import Config, ConfigError
from megaflamingo.models.flamingo import xattn_layer_indices
from megaflamingo.models.flops import count_flops, lm_shape, vision_shape
from megaflamingo.parallel.layers import shard_bounds
from megaflamingo.parallel.topology import ParallelDims
from megaflamingo.resolve import batch_layout, check_layout
from megaflamingo.planning import activations as act
from megaflamingo.planning.inputs import meta_model
from megaflamingo.planning.params import ParamCounts, rank_params

GiB = 2**30


class PlanError(ConfigError):
    """The layout is legal but a rank does not fit the device memory it was given."""


@dataclass(frozen=True)
class StreamPlan:
    """One data stream's layout and FLOPs."""

    name: str
    batch_size: int
    micro_batch: act.MicroBatch
    accumulation: int
    flops_per_sample: float
    """True (frozen-aware) training FLOPs of one sample, `models.flops.count_flops`."""
    hardware_flops_per_sample: float


@dataclass
class RankPlan:
    """One rank's place, parameters and memory terms (bytes)."""

    rank: int
    host: str
    coords: dict[str, int]
    params: ParamCounts
    memory: dict[str, float] = field(default_factory=dict)

    @property
    def peak(self) -> float:
        return sum(self.memory.values())


@dataclass
class Plan:
    """The whole plan: layout, streams, stage boundaries, every rank."""

    dims: ParallelDims
    parts: list[int]
    streams: list[StreamPlan]
    ranks: list[RankPlan]
    gpu_mem: float | None
    notes: list[str]
    settings: str = ""
    """Precision, frozen dtype, ZeRO stage, activation checkpointing, in words."""

    @property
    def micro_batches(self) -> int:
        return sum(s.accumulation for s in self.streams)

    @property
    def bubble(self) -> float:
        pp = self.dims.pp
        return (pp - 1) / (self.micro_batches + pp - 1)

    @property
    def flops_per_step(self) -> float:
        return sum(s.batch_size * s.flops_per_sample for s in self.streams)


def _streams(cfg: Config, dims: ParallelDims) -> list[StreamPlan]:
    """The streams with shards (every stream when none has any), laid out on `dims`."""

    names = [n for n in ("laion", "mmc4") if getattr(cfg.data, n).shards is not None] or ["laion", "mmc4"]
    out = []
    for name in names:
        s = getattr(cfg.data, name)
        micro, gas = batch_layout(s.batch_size, dims, s.micro_batch_size)
        flops = count_flops(cfg.model, s.seq_len, s.max_num_media, recompute=cfg.parallel.activation_checkpointing)
        out.append(StreamPlan(name, s.batch_size, act.MicroBatch(micro, s.seq_len, s.max_num_media), gas,
                              flops.true, flops.hardware))
    return out


def _partition(cfg: Config, model, pp: int) -> list[int]:
    num_layers = len(model.lm.layers)
    if pp == 1:
        return [0, num_layers + 2]
    from megaflamingo.parallel.pipeline import balanced_partition, explicit_partition
    from megaflamingo.training.engine import pipeline_layer_costs

    if cfg.parallel.pipeline_partition is not None:
        return explicit_partition(cfg.parallel.pipeline_partition, num_layers, pp)
    return balanced_partition(pipeline_layer_costs(cfg, model), pp)


def _stage_activations(cfg: Config, parts: list[int], stage: int, vocab_local: int,
                       mb: act.MicroBatch, dims: ParallelDims, a: int) -> tuple[float, float]:
    """(saved bytes of one micro-batch, largest transient) on one stage."""
    m, lm, v = cfg.model, lm_shape(cfg.model), vision_shape(cfg.model)
    layers = range(parts[stage], parts[stage + 1])
    blocks = [i - 1 for i in layers if 1 <= i <= lm.num_layers]
    xattn = set(xattn_layer_indices(lm.num_layers, m.cross_attn_every_n_layers))
    with_x = [i for i in blocks if i in xattn]
    saved = transient = 0.0
    if 0 in layers:
        saved += act.perceiver_bytes(m, v, mb, a)
        transient = act.vision_transient_bytes(v, mb, a)
    if with_x or (0 in layers and xattn):
        saved += act.media_bytes(m, v, mb, a)
    if blocks:
        layer = act.lm_layer_bytes(lm, mb, dims.tp, a)
        block = act.xattn_block_bytes(m, lm.hidden_size, mb, dims.tp, a)
        if cfg.parallel.activation_checkpointing:
            saved += (len(blocks) + len(with_x)) * act.checkpointed_layer_bytes(lm.hidden_size, mb, a)
            transient = max(transient, layer + (block if with_x else 0.0))
        else:
            saved += len(blocks) * layer + len(with_x) * block
        saved += act.alibi_mask_bytes(lm, mb, a) * (1 if dims.pp == 1 else len(blocks))
    if lm.num_layers + 1 in layers:
        saved += act.head_bytes(lm, vocab_local, mb, a)
        transient = max(transient, act.head_transient_bytes(vocab_local, mb, a))
    return saved, transient


def _memory(cfg: Config, counts: ParamCounts, dims: ParallelDims, activation: float) -> dict[str, float]:
    w = 2 if cfg.train.precision == "bf16" else 4
    k = 12 if cfg.train.precision == "bf16" else 8
    z, dp = cfg.parallel.zero_stage, dims.dp
    fw = {"bf16": 2, "fp32": 4}.get(cfg.model.frozen_dtype, w)
    return {
        "frozen_weights": fw * counts.frozen / (dp if z == 3 else 1),
        "trainable_weights": w * counts.trainable / (dp if z == 3 else 1),
        "gradients": w * counts.trainable / (dp if z >= 2 else 1),
        "optimizer": k * counts.trainable / (dp if z >= 1 else 1),
        "zero3_gather": w * counts.largest_layer if z == 3 else 0.0,
        "activations": activation,
    }


def build_plan(cfg: Config, world_size: int, hosts: list[str] | None = None, gpu_mem: float | None = None,
               notes: list[str] | None = None) -> Plan:
    """Plan `cfg` on `world_size` ranks: parameters, memory terms and FLOPs, nothing allocated.

    Args:
        cfg: a config from `load_plan_config`.
        world_size: ranks in the run (a hostfile's slots).
        hosts: the host of each rank (from the hostfile), or None.
        gpu_mem: device memory per rank in bytes, or None (no fit check).
        notes: what `load_plan_config` assumed, carried into the report.
    Returns:
        The `Plan`.
    Raises:
        ConfigError: an illegal layout (the same one-line errors as training) or batch split.
    """
    dims = check_layout(cfg, world_size)
    model = meta_model(cfg)
    streams, parts = _streams(cfg, dims), _partition(cfg, model, dims.pp)
    notes = list(notes or [])
    if all(getattr(cfg.data, s.name).shards is None for s in streams):
        notes.append("no stream has shards: both streams planned with their configured batch sizes")
    a = 2 if cfg.train.precision == "bf16" else 4
    vocab = model.lm.embed_tokens.num_embeddings
    gas, cache, ranks = sum(s.accumulation for s in streams), {}, []
    for rank in range(world_size):
        c = dims.coords(rank)
        key = (c["pp"], c["tp"])
        if key not in cache:
            counts = rank_params(model, parts, c["pp"], dims.tp, c["tp"])
            start, end = shard_bounds(vocab, c["tp"], dims.tp)
            per_stream = [_stage_activations(cfg, parts, c["pp"], end - start, s.micro_batch, dims, a)
                          for s in streams]
            in_flight = 1 if dims.pp == 1 else min(dims.pp - c["pp"], gas)
            activation = in_flight * max(p[0] for p in per_stream) + max(p[1] for p in per_stream)
            cache[key] = (counts, _memory(cfg, counts, dims, activation))
        counts, memory = cache[key]
        ranks.append(RankPlan(rank, hosts[rank] if hosts else "-", c, counts, dict(memory)))
    p = cfg.parallel
    settings = (f"precision {cfg.train.precision}, frozen weights {cfg.model.frozen_dtype or cfg.train.precision}, "
                f"ZeRO-{p.zero_stage}, activation checkpointing {'on' if p.activation_checkpointing else 'off'}")
    return Plan(dims, parts, streams, ranks, gpu_mem, notes, settings)


def check_fits(plan: Plan) -> None:
    """Raises PlanError (one line) naming the first rank whose peak exceeds the device memory."""
    if plan.gpu_mem is None:
        return
    worst = max(plan.ranks, key=lambda r: r.peak)
    if worst.peak > plan.gpu_mem:
        c = worst.coords
        raise PlanError(f"does not fit: rank {worst.rank} (stage {c['pp']}, tp rank {c['tp']}) needs "
                        f"{worst.peak / GiB:.1f} GiB > {plan.gpu_mem / GiB:.1f} GiB per device")
