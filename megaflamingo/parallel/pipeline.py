"""A Flamingo model as a DeepSpeed `PipelineModule`: stage layers, compute-balanced partition, tied rows.

Shapes: B batch, M media, N latents, T text tokens, D LM width, Dv vision width, V_local this
rank's vocabulary rows.

Layers, in order (L decoder layers); each holds the model's own `models.fusion` pieces and calls
them, so a stage computes exactly what the plain model does:

    0        PipelineEmbed   MediaEncoder + token embedding:
                             (images, input_ids, attention_mask) -> (h, media, text_time, mask)
    1..L     PipelineBlock i FusionLayer i (optional cross-attention block, then decoder layer i):
                             (h, media, text_time, mask) -> same tuple. Media stop travelling after
                             the last cross-attention block: from there the tuple is (h, mask).
    L+1      PipelineHead    LMHead: (h, mask) -> logits (B, T, V_local);
                             loss_fn(logits, (labels, loss_weight))

What travels obeys DeepSpeed's rules: every float sent requires grad (h, and the media latents,
which the trainable Perceiver made), every float received reaches the loss (media are dropped by
the block that uses them last), integers (text_time, the mask) carry no gradient. Each stage
rebuilds the attention context from the mask instead of receiving it. A stage without any
trainable parameter of an AdamW group (decay / no decay) gets a 1-element zero `anchor` in it:
DeepSpeed cannot build an optimizer for a stage without parameters, and ZeRO-1 runs one
grad-norm collective per parameter group across the stages.

With a tied LM head the trainable `<image>` / `<|endofchunk|>` rows live on the first and the last
stage; their gradients are summed between the two (`get_tied_weights_and_groups`, which the
engine all-reduces before the data-parallel reduction) and the last stage's copy is excluded from
the gradient norm.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.pipe import PipelineModule

from megaflamingo.config import ConfigError, LMConfig
from megaflamingo.models.cross_attention import GatedCrossAttentionBlock
from megaflamingo.models.decoder import LMHead, attention_context
from megaflamingo.models.flamingo import Flamingo
from megaflamingo.models.fusion import FusionLayer, MediaEncoder
from megaflamingo.parallel.plan import gather_full_state, logits_vocab_start
from megaflamingo.parallel.topology import ProcessGroups, deepspeed_topology

LossFn = Callable[..., torch.Tensor]
"""loss(logits, labels, loss_weight, vocab_group=..., vocab_start=...) -> scalar."""


def make_anchor(weight_decay: bool) -> nn.Parameter:
    """A 1-element trainable zero that a stage adds (as + 0 * anchor) to hold a parameter group.

    `weight_decay` says which AdamW group it joins (engine.param_groups reads the attribute).
    It stays 0: its gradient is 0 and so is its decay.
    """
    anchor = nn.Parameter(torch.zeros(1))
    anchor.megaflamingo_weight_decay = weight_decay
    return anchor


class StageLayer(nn.Module):
    """A pipeline layer that may carry anchors (see `make_anchor` and `_add_anchors`)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchors = nn.ParameterList()

    def touch_anchors(self, h: torch.Tensor) -> torch.Tensor:
        """h + 0 * each anchor: puts the anchors on the graph without changing h."""
        for anchor in self.anchors:
            h = h + 0.0 * anchor
        return h


class PipelineEmbed(StageLayer):
    """First layer: the media encoder (vision tower + Perceiver) and the token embedding.

    Args:
        media: the model's `MediaEncoder` (`Flamingo.media_encoder()`).
        embed_tokens: the LM's token embedding (maybe vocab-parallel).
        sends_media: some later layer has a cross-attention block (else only (h, mask) travel).
    """

    def __init__(self, media: MediaEncoder, embed_tokens: nn.Module, sends_media: bool) -> None:
        super().__init__()
        self.media, self.embed_tokens, self.sends_media = media, embed_tokens, sends_media

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Args: (images (B, M, 1, C, S, S), input_ids (B, T), attention_mask (B, T)).
        Returns: (h (B, T, D), media (B, M, N, Dv), text_time (B, T), mask (B, T)) or (h, mask)."""
        images, input_ids, mask = inputs
        h = self.touch_anchors(self.embed_tokens(input_ids))  # (B, T, D)
        if not h.requires_grad:  # frozen embeddings: DeepSpeed only sends tensors that require grad
            h = h.detach().requires_grad_()
        if not self.sends_media:
            return h, mask
        media = self.media(images.detach().to(h.dtype))  # (B, M, N, Dv)
        return h, media, self.media.text_time(input_ids), mask


class PipelineBlock(StageLayer):
    """One `FusionLayer`: optional gated cross-attention block, then decoder layer i.

    Args:
        fusion: the model's fusion layer i (`Flamingo.fusion_layers()[i]`).
        cfg: the LM config (each block rebuilds the attention context from the mask with
            `decoder.attention_context`).
        receives_media: the input tuple still carries media and text_time.
        sends_media: the output tuple carries them on (False from the last cross-attention block).
    """

    def __init__(self, fusion: FusionLayer, cfg: LMConfig, receives_media: bool, sends_media: bool) -> None:
        super().__init__()
        self.fusion, self.cfg = fusion, cfg
        self.receives_media, self.sends_media = receives_media, sends_media

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Args / Returns: (h, media, text_time, mask) or (h, mask); see the module docstring."""
        if self.receives_media:
            h, media, text_time, mask = inputs
        else:
            (h, mask), media, text_time = inputs, None, None
        if self.receives_media and not self.sends_media:
            # Media end here: keep them on the graph even when no token of this micro-batch
            # attends to an image, so the received latents always get a (zero) gradient.
            h = h + 0.0 * media.sum()
        ctx = attention_context(self.cfg, mask, h.shape[1], h.device, h.dtype)
        h = self.touch_anchors(self.fusion(h, ctx, media, text_time))
        return (h, media, text_time, mask) if self.sends_media else (h, mask)


class PipelineHead(StageLayer):
    """Last layer: the LM's `LMHead` (final norm and head), vocab-sharded logits out; with
    `logits=False` the final norm only (a fused loss applies the head itself)."""

    def __init__(self, head: LMHead, logits: bool = True) -> None:
        super().__init__()
        self.head, self.logits = head, logits

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Args: (h (B, T, D), mask). Returns: logits (B, T, V_local), or normed h (B, T, D)."""
        h = self.touch_anchors(inputs[0])
        return self.head(h) if self.logits else self.head.norm(h)


class PipelineLoss:
    """loss_fn(outputs, labels) for DeepSpeed: labels = (labels (B, T), loss_weight (B,)).

    While `recorded` is a list (the training loop sets one per step, to report per-stream losses),
    every loss computed is also appended to it, detached, in micro-batch order; None records nothing.
    """

    def __init__(self, loss: LossFn, vocab_group: dist.ProcessGroup | None, vocab_start: int) -> None:
        self.loss, self.vocab_group, self.vocab_start = loss, vocab_group, vocab_start
        self.__name__ = getattr(loss, "__name__", "loss")
        self.recorded: list[torch.Tensor] | None = None

    def __call__(self, logits: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        loss = self.loss(logits, labels[0], labels[1], vocab_group=self.vocab_group,
                         vocab_start=self.vocab_start)
        if self.recorded is not None:
            self.recorded.append(loss.detach())
        return loss


# ----------------------------------------------------------------------------- partition


def default_layer_costs(model: Flamingo) -> list[float]:
    """Relative cost of each pipeline layer when no measured shapes are at hand.

    Per text token: a decoder layer 1 unit, a cross-attention block 1 more, the embed layer (vision
    + Perceiver) 1, the head 1. `megaflamingo.training.engine` passes FLOP-based costs instead.
    """
    blocks = [1.0 + (1.0 if str(i) in model.xattn else 0.0) for i in range(len(model.lm.layers))]
    return [1.0, *blocks, 1.0]


def balanced_partition(costs: Sequence[float], num_stages: int) -> list[int]:
    """Cut `costs` into `num_stages` contiguous non-empty parts minimising the costliest part.

    Returns:
        Boundaries [0, b_1, ..., len(costs)]: stage s holds layers [b_s, b_{s+1}).
    Raises:
        ValueError: fewer layers than stages.
    """
    n = len(costs)
    if num_stages > n:
        raise ValueError(f"{num_stages} pipeline stages need at least as many layers, got {n}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[k][j]: minimal max-part cost splitting layers [0, j) into k parts; cut[k][j]: last cut.
    best = [[float("inf")] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], prefix[j] - prefix[i])
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    bounds = [n]
    for k in range(num_stages, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    return bounds[::-1]


def explicit_partition(stage_starts: Sequence[int], num_layers: int, num_stages: int) -> list[int]:
    """Boundaries from `parallel.pipeline_partition`: the first decoder layer of stages 1..pp-1.

    Stage 0 always holds the embed layer, the last stage the head; a start of L leaves the last
    stage only the head.

    Raises:
        ConfigError: wrong count, or starts not strictly increasing within [0, L].
    """
    starts = list(stage_starts)
    if len(starts) != num_stages - 1:
        raise ConfigError(f"parallel.pipeline_partition: expected {num_stages - 1} stage starts "
                          f"(first decoder layer of stages 1..{num_stages - 1}), got {starts}")
    if any(not 0 <= s <= num_layers for s in starts) or any(a >= b for a, b in zip(starts, starts[1:])):
        raise ConfigError(f"parallel.pipeline_partition: starts must increase strictly within "
                          f"[0, {num_layers}], got {starts}")
    return [0, *(s + 1 for s in starts), num_layers + 2]


# ----------------------------------------------------------------------------- module


class FlamingoPipelineModule(PipelineModule):
    """PipelineModule with our partition and the tied added-token rows of a tied LM head.

    Args:
        layers: the pipeline layers (embed, blocks, head).
        parts: stage boundaries over `layers`.
        tied_group: the process group {first stage, last stage} of this rank's (dp, tp)
            coordinate when the head is tied and the added rows train, else None.
        tied_param: the added-rows parameter (first and last stage), else None.
        **kwargs: passed to PipelineModule.
    """

    def __init__(self, layers: list[nn.Module], parts: list[int], tied_group: dist.ProcessGroup | None = None,
                 tied_param: nn.Parameter | None = None, **kwargs: Any) -> None:
        self._parts = list(parts)
        super().__init__(layers, **kwargs)
        self._tied = []
        holds = tied_param is not None and any(p is tied_param for p in self.parameters())
        if tied_group is not None and holds:
            self._tied = [(tied_param, tied_group)]
            if self.stage_id != 0:  # count the last stage's copy once (grad norm), as DeepSpeed does
                tied_param.ds_pipe_replicated = True

    def _partition_layers(self, method: str = "uniform") -> None:
        # Replaces DeepSpeed's own methods (uniform / parameters / type:) with the boundaries we
        # computed from compute costs or the config.
        self.parts = list(self._parts)
        self._set_bounds(start=self.parts[self.stage_id], stop=self.parts[self.stage_id + 1])

    def get_tied_weights_and_groups(self) -> list:
        """DeepSpeed's tied weights plus the added-token rows shared by the first and last stage."""
        return super().get_tied_weights_and_groups() + self._tied

    def allreduce_tied_weight_gradients(self) -> None:
        """Sum the tied weights' gradients over their groups (DeepSpeed's and the added rows')."""
        super().allreduce_tied_weight_gradients()
        for weight, group in self._tied:
            dist.all_reduce(weight.grad, group=group)


def stage_parts(model: Flamingo, pp: int, partition: Sequence[int] | None,
                costs: Sequence[float] | None) -> list[int]:
    """Stage boundaries over [embed, L blocks, head]: the explicit `partition` (stage starts), or
    the balanced partition of `costs` (None: `default_layer_costs`). Reads only the model's shape
    (a meta-device model will do).

    Raises:
        ConfigError: a bad explicit partition. ValueError: costs of the wrong length.
    """
    num_layers = len(model.lm.layers)
    if partition is not None:
        return explicit_partition(partition, num_layers, pp)
    costs = list(costs) if costs is not None else default_layer_costs(model)
    if len(costs) != num_layers + 2:
        raise ValueError(f"costs must have {num_layers + 2} entries (embed, layers, head), got {len(costs)}")
    return balanced_partition(costs, pp)


def _add_anchors(layers: list[StageLayer], parts: list[int]) -> None:
    """Give every stage at least one trainable parameter of each AdamW group (decay / no decay).

    DeepSpeed needs >= 1 trainable parameter per stage, and ZeRO-1 all-reduces the grad norm over
    the model-parallel group (all stages) once per parameter group: stages with different group
    counts would deadlock. A stage without cross-attention has no decayed parameter, one without
    Perceiver / added rows no undecayed one; an anchor fills the gap.
    """
    for start, stop in zip(parts, parts[1:]):
        stage = layers[start:stop]
        decayed = {id(p) for layer in stage for m in layer.modules()
                   if isinstance(m, GatedCrossAttentionBlock) for p in m.parameters()}
        trainable = [p for layer in stage for p in layer.parameters() if p.requires_grad]
        if not any(id(p) in decayed for p in trainable):
            stage[-1].anchors.append(make_anchor(weight_decay=True))
        if not any(id(p) not in decayed for p in trainable):
            stage[-1].anchors.append(make_anchor(weight_decay=False))


def _build_layers(model: Flamingo, parts: list[int], head_logits: bool = True) -> list[StageLayer]:
    """Embed, blocks and head, with anchors where a stage lacks a parameter group."""
    fusion = model.fusion_layers()
    last_xattn = max((i for i, f in enumerate(fusion) if f.xattn is not None), default=-1)
    embed = PipelineEmbed(model.media_encoder(), model.lm.embed_tokens, sends_media=last_xattn >= 0)
    blocks = [PipelineBlock(f, model.lm.cfg, receives_media=i <= last_xattn, sends_media=i < last_xattn)
              for i, f in enumerate(fusion)]
    layers: list[StageLayer] = [embed, *blocks, PipelineHead(model.lm.head(), head_logits)]
    _add_anchors(layers, parts)
    return layers


def _tied_added_group(model: Flamingo, groups: ProcessGroups) -> dist.ProcessGroup | None:
    """The {stage 0, last stage} group of this rank's (dp, tp), built collectively on every rank."""
    dims, mine = groups.dims, None
    for dp in range(dims.dp):
        for tp in range(dims.tp):
            ranks = [dims.rank(pp=0, dp=dp, tp=tp), dims.rank(pp=dims.pp - 1, dp=dp, tp=tp)]
            group = dist.new_group(ranks)
            if groups.rank in ranks:
                mine = group
    if mine is not None:  # start both copies from the first stage's rows
        dist.broadcast(model.lm.embed_tokens.added.data, src=dims.rank(0, groups.dp_rank, groups.tp_rank),
                       group=mine)
    return mine


def _mark_grad_norm_owners(module: FlamingoPipelineModule, groups: ProcessGroups) -> None:
    """Make DeepSpeed's global grad norm count each parameter once.

    DeepSpeed counts a parameter if `model_parallel` is set or its rank is rank 0 of the
    model-parallel group, which for a pipeline spans all stages and TP ranks of one replica: untagged
    replicated parameters of stages > 0 would not be counted at all. TP shards are tagged already;
    a replicated trainable parameter is tagged on TP rank 0 of its stage only.
    """
    for param in module.parameters():
        if param.requires_grad and not getattr(param, "tensor_model_parallel", False):
            param.model_parallel = groups.tp_rank == 0 and not getattr(param, "ds_pipe_replicated", False)


def build_pipeline_module(model: Flamingo, groups: ProcessGroups, loss: LossFn, *,
                          partition: Sequence[int] | None = None, costs: Sequence[float] | None = None,
                          parts: Sequence[int] | None = None,
                          activation_checkpointing: bool = False) -> FlamingoPipelineModule:
    """Express a (tensor-parallelised) Flamingo as a DeepSpeed PipelineModule over `groups`.

    Args:
        model: a rank-local model (`parallel.materialize.build_rank_model`: this stage's layers
            materialised, the others on the meta device; never touched here), or a full model after
            `apply_tensor_parallel` when tp > 1 (all ranks holding the same weights).
        groups: this rank's process groups (their layout gives pp; the topology is DeepSpeed's
            PipeModelDataParallelTopology of the same layout).
        loss: the loss, called loss(logits, labels, loss_weight, vocab_group=, vocab_start=) (with the
            final-norm output in place of the logits when `loss.takes_hidden`, a fused head + loss).
        partition: explicit stage starts (`parallel.pipeline_partition`), or None.
        costs: per-layer costs (embed, L blocks, head) to balance when no explicit partition.
        parts: the stage boundaries the rank-local model was built for (overrides partition/costs).
        activation_checkpointing: recompute each block in backward (non-reentrant).
    Returns:
        The module; `.flamingo_names` maps its parameter names to the plain model's (anchors have none).
    Raises:
        ConfigError: a bad explicit partition.
    """
    dims = groups.dims
    parts = list(parts) if parts is not None else stage_parts(model, dims.pp, partition, costs)
    names = {id(p): name for name, p in model.named_parameters()}
    added = model.lm.embed_tokens.added
    tie = model.lm.lm_head is None and added is not None and added.requires_grad
    tied_group = _tied_added_group(model, groups) if tie else None
    module = FlamingoPipelineModule(
        _build_layers(model, parts, not getattr(loss, "takes_hidden", False)), parts, tied_group=tied_group,
        tied_param=added if tie else None,
        topology=deepspeed_topology(dims),
        loss_fn=PipelineLoss(loss, groups.tp if dims.tp > 1 else None, logits_vocab_start(model.lm)),
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
        activation_checkpoint_func=_non_reentrant_checkpoint,
        checkpointable_layers=["PipelineBlock"], dynamic_shape=True,
    )
    _mark_grad_norm_owners(module, groups)
    module.flamingo_names = {n: names[id(p)] for n, p in module.named_parameters() if id(p) in names}
    return module


def _non_reentrant_checkpoint(function: Callable, *args: Any) -> Any:
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


def pipeline_full_state(module: FlamingoPipelineModule, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """This stage's model parameters, TP shards gathered, under the plain model's names (anchors left
    out); collective over the tensor-parallel group."""
    state = gather_full_state(module, trainable_only)
    return {module.flamingo_names[k]: v for k, v in state.items() if k in module.flamingo_names}
