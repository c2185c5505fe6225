"""Layout arithmetic and validation, no process group: ParallelDims, check_layout's one-line
errors, the batch layout, the pipeline partition, shard bounds, and the loss's split invariance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megaflamingo.config import ConfigError
from megaflamingo.parallel.layers import _shard_rows, shard_bounds, vocab_parallel_cross_entropy
from megaflamingo.parallel.pipeline import balanced_partition, explicit_partition
from megaflamingo.parallel.topology import AXES, ParallelDims
from megaflamingo.resolve import check_layout
from megaflamingo.training.engine import batch_layout
from megaflamingo.training.loss import flamingo_loss
from tests.parallel.cases import global_batch, run_config


# ----------------------------------------------------------------------------- ParallelDims


@pytest.mark.parametrize("tp,pp,dp", [(1, 1, 1), (2, 1, 2), (2, 2, 2), (1, 4, 1), (4, 2, 3)])
def test_coords_and_rank_are_inverse_and_tp_is_innermost(tp: int, pp: int, dp: int) -> None:
    dims = ParallelDims(tp=tp, pp=pp, dp=dp)
    assert dims.world_size == tp * pp * dp
    for rank in range(dims.world_size):
        assert dims.rank(**dims.coords(rank)) == rank
    assert dims.groups("tp")[0] == list(range(tp))  # consecutive ranks: one node
    for axis in AXES:
        flat = sorted(r for g in dims.groups(axis) for r in g)
        assert flat == list(range(dims.world_size))  # each axis partitions the world
        assert all(len(g) == getattr(dims, axis) for g in dims.groups(axis))


def test_layout_agrees_with_deepspeed_topology() -> None:
    from megaflamingo.parallel.topology import deepspeed_topology

    dims = ParallelDims(tp=2, pp=2, dp=3)
    topo = deepspeed_topology(dims)
    for rank in range(dims.world_size):
        c = dims.coords(rank)
        assert topo.get_rank(pipe=c["pp"], data=c["dp"], model=c["tp"]) == rank


def test_from_world_and_bad_sizes() -> None:
    assert ParallelDims.from_world(8, tp=2, pp=2) == ParallelDims(tp=2, pp=2, dp=2)
    with pytest.raises(ConfigError):
        ParallelDims.from_world(6, tp=4)
    with pytest.raises(ConfigError):
        ParallelDims(tp=0)


# ----------------------------------------------------------------------------- illegal layouts


ILLEGAL = [
    ("pp2-zero2", 4, dict(pp=2, zero=2), "ZeRO stage 0 or 1"),
    ("pp2-zero3", 4, dict(pp=2, zero=3), "ZeRO stage 0 or 1"),
    ("tp*pp does not divide", 6, dict(tp=2, pp=2), "does not divide the world size 6"),
    ("tp vs heads", 3, dict(tp=3), "num_heads=4"),
    ("tp vs kv heads", 4, dict(tp=4), "num_kv_heads=2"),
    ("fewer layers than stages", 8, dict(pp=8), "more than model.lm.num_layers=4"),
]


@pytest.mark.parametrize("world,parallel,words", [c[1:] for c in ILLEGAL], ids=[c[0] for c in ILLEGAL])
def test_illegal_layout_is_a_one_line_config_error(world: int, parallel: dict, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_layout(run_config("llama", **parallel), world)
    message = str(info.value)
    assert words in message and "\n" not in message


def test_xattn_heads_must_divide_too() -> None:
    cfg = run_config("mpt", tp=4)  # 4 LM heads, 2 cross-attention heads
    with pytest.raises(ConfigError, match="model.xattn.heads=2"):
        check_layout(cfg, 4)


@pytest.mark.parametrize("world,parallel", [(8, dict(tp=2, pp=2, zero=1)), (4, dict(tp=2, zero=3)),
                                            (4, dict(pp=4)), (2, dict(zero=2))])
def test_legal_layouts_pass(world: int, parallel: dict) -> None:
    assert check_layout(run_config("llama", **parallel), world).world_size == world


# ----------------------------------------------------------------------------- batch layout


def test_batch_layout_keeps_the_global_batch() -> None:
    assert batch_layout(8, ParallelDims(dp=2)) == (4, 1)
    assert batch_layout(8, ParallelDims(dp=2), micro_batch_size=2) == (2, 2)
    assert batch_layout(8, ParallelDims(pp=2, dp=2)) == (2, 2)  # >= pp micro-batches in flight
    assert batch_layout(8, ParallelDims(pp=4)) == (2, 4)
    for dims in (ParallelDims(dp=4), ParallelDims(tp=2, pp=2, dp=2), ParallelDims(pp=8)):
        micro, gas = batch_layout(16, dims)
        assert micro * gas * dims.dp == 16


def test_batch_layout_errors() -> None:
    with pytest.raises(ConfigError, match="not divisible by dp=3"):
        batch_layout(8, ParallelDims(dp=3))
    with pytest.raises(ConfigError, match="does not divide the per-rank share 4"):
        batch_layout(8, ParallelDims(dp=2), micro_batch_size=3)


# ----------------------------------------------------------------------------- pipeline partition


def test_balanced_partition_balances_compute_not_layers() -> None:
    # embed, 4 blocks (two with cross-attention, cost 2), head
    assert balanced_partition([1, 1, 2, 1, 2, 1], 2) == [0, 3, 6]
    assert balanced_partition([1, 1, 1, 1], 4) == [0, 1, 2, 3, 4]
    assert balanced_partition([10, 1, 1, 1, 1], 2) == [0, 1, 5]  # a costly vision tower stands alone
    with pytest.raises(ValueError):
        balanced_partition([1, 1], 3)


def test_explicit_partition() -> None:
    assert explicit_partition([3], num_layers=4, num_stages=2) == [0, 4, 6]
    assert explicit_partition([0, 2, 4], num_layers=4, num_stages=4) == [0, 1, 3, 5, 6]
    for bad, stages in (([], 2), ([1, 2], 2), ([5], 2), ([-1], 2), ([2, 2, 3], 4)):
        with pytest.raises(ConfigError, match="pipeline_partition"):
            explicit_partition(bad, num_layers=4, num_stages=stages)


# ----------------------------------------------------------------------------- sharding and loss


@pytest.mark.parametrize("size,world", [(67, 2), (64, 4), (5, 3), (8, 8)])
def test_shard_bounds_cover_the_rows_in_order(size: int, world: int) -> None:
    bounds = [shard_bounds(size, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert max(e - s for s, e in bounds) - min(e - s for s, e in bounds) <= 1


def test_fused_kv_rows_shard_each_half() -> None:
    weight = torch.arange(8.0)[:, None]  # k rows 0..3, v rows 4..7
    assert _shard_rows(weight, 0, 2, parts=2).flatten().tolist() == [0, 1, 4, 5]
    assert _shard_rows(weight, 1, 2, parts=2).flatten().tolist() == [2, 3, 6, 7]


def test_cross_entropy_without_group_is_torch_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen)
    targets = torch.randint(0, 11, (3, 5), generator=gen)
    targets[0, 1] = -100
    ours = vocab_parallel_cross_entropy(logits, targets)
    theirs = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(3, 5)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_global_loss_is_the_mean_of_equal_micro_batch_losses() -> None:
    """What makes every (dp, gas) split of a global batch train on the same loss."""
    batch = global_batch()
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(*batch["input_ids"].shape, 67, generator=gen)
    whole = flamingo_loss(logits, batch["labels"], batch["loss_weight"])
    for micro in (1, 2, 4):
        parts = [flamingo_loss(logits[i:i + micro], batch["labels"][i:i + micro], batch["loss_weight"][i:i + micro])
                 for i in range(0, 8, micro)]
        torch.testing.assert_close(torch.stack(parts).mean(), whole, rtol=1e-6, atol=0)


def test_activation_checkpointing_recomputes_blocks_and_keeps_names() -> None:
    from megaflamingo.training.engine import apply_activation_checkpointing
    from tests.parallel.cases import build_tiny_model

    model = build_tiny_model("llama")
    names = [n for n, _ in model.named_parameters()]
    apply_activation_checkpointing(model)
    assert [n for n, _ in model.named_parameters()] == names
    calls = []
    # pre-hooks on early children: the checkpointed module's own hooks are off while it
    # recomputes, and recompute stops as soon as every saved tensor is back
    model.lm.layers[1].attn.register_forward_pre_hook(lambda *_: calls.append("layer"))
    model.xattn["1"].to_q.register_forward_pre_hook(lambda *_: calls.append("xattn"))
    batch = global_batch()
    logits = model(batch["images"][:2], batch["input_ids"][:2], batch["attention_mask"][:2])
    assert calls == ["xattn", "layer"]
    logits.sum().backward()
    assert sorted(calls) == ["layer", "layer", "xattn", "xattn"]  # recomputed in backward
