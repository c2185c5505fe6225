"""Sharding, determinism, exact resume and per-step mixing of the training loaders."""

from __future__ import annotations

import itertools

import pytest
import torch

from megaflamingo.config import ConfigError
from megaflamingo.data.loader import build_stream_loader, build_train_loader, interleave
from megaflamingo.data.sharding import Position, StreamPlan, iter_reader
from megaflamingo.data.shards import ShardNotFoundError, expand_shards, read_shard
from tests.data.common import make_config, stream

LAION = "laion/{00000..00011}.tar"
MMC4 = "mmc4/{00000..00003}.tar"


def data_section(root, workers: int = 2, **laion) -> dict:
    return {
        "laion": stream(str(root / LAION), batch_size=8, micro_batch_size=2, loss_multiplier=0.2,
                        shuffle_buffer=7, **laion),
        "mmc4": stream(str(root / MMC4), batch_size=4, micro_batch_size=2, seq_len=64,
                       max_num_media=3),
        "mmc4_options": {"min_image_bytes": 0},
        "workers": workers,
    }


def take(iterator, n: int) -> list:
    return list(itertools.islice(iterator, n))


def assert_same_steps(a: list, b: list) -> None:
    assert len(a) == len(b)
    for step_a, step_b in zip(a, b):
        assert len(step_a) == len(step_b)
        for mb_a, mb_b in zip(step_a, step_b):
            assert mb_a.keys() == mb_b.keys()
            for key in mb_a:
                assert torch.equal(mb_a[key], mb_b[key]), key


def epoch_keys(plan: StreamPlan, reader: int) -> list[str]:
    """The sample keys one reader reads in epoch 0."""
    keys = []
    for after, unit, epoch, raw in iter_reader(plan, reader, Position()):
        if epoch > 0:
            return keys
        keys.append(f"{unit.shard}#{raw.key}")
    raise AssertionError("unreachable: readers are infinite")


def all_keys(shards) -> set[str]:
    return {f"{s}#{raw.key}" for s, path in enumerate(shards) for raw in read_shard(path, lambda i: True)}


# ----------------------------------------------------------------------------- resume


def test_resume_is_exact_across_2_dp_ranks_x_2_workers(easy_vqa_dir, tokenizer_dir, tokenizer):
    cfg = make_config(tokenizer_dir, data_section(easy_vqa_dir))
    for dp_rank in range(2):
        first = build_train_loader(cfg, tokenizer, dp_rank, 2)
        run = iter(first)
        take(run, 33)  # far enough that readers cross into epoch 1
        state = first.state_dict()
        skipped = first.skipped()
        expected = take(run, 6)
        resumed = build_train_loader(cfg, tokenizer, dp_rank, 2, state=state)
        assert resumed.skipped() == skipped
        assert_same_steps(take(iter(resumed), 6), expected)
        assert resumed.skipped() == first.skipped()
        epochs = {p["epoch"] for p in state["laion"]["positions"] + state["mmc4"]["positions"]}
        assert max(epochs) >= 1, state
        assert sum(first.skipped()["mmc4"].values()) > 0  # the rules really reject documents


def test_a_state_from_another_layout_is_refused(easy_vqa_dir, tokenizer_dir, tokenizer):
    cfg = make_config(tokenizer_dir, data_section(easy_vqa_dir))
    state = build_train_loader(cfg, tokenizer, 0, 2).state_dict()
    with pytest.raises(ValueError, match="does not match"):
        build_train_loader(cfg, tokenizer, 0, 4, state=state)


# ----------------------------------------------------------------------------- sharding


def test_dp_ranks_are_disjoint_and_cover_the_epoch(easy_vqa_dir):
    for pattern in (LAION, MMC4, "laion/{00000..00001}.tar"):  # the last: 2 shards, 4 readers
        shards = tuple(expand_shards(str(easy_vqa_dir / pattern)))
        plan = StreamPlan(shards=shards, num_readers=4, seed=3, stream="laion", shuffle_block=5)
        per_reader = [epoch_keys(plan, r) for r in range(4)]
        assert all(per_reader), "every reader has work"
        flat = [k for keys in per_reader for k in keys]
        assert len(flat) == len(set(flat)), "no sample is read twice in an epoch"
        assert set(flat) == all_keys(shards), "together the readers cover the epoch"


def test_resampled_readers_draw_shards_with_replacement_deterministically(easy_vqa_dir):
    shards = tuple(expand_shards(str(easy_vqa_dir / LAION)))
    plan = StreamPlan(shards=shards, num_readers=4, seed=3, stream="laion", resampled=True)
    draws = {(e, r): [u.shard for u in plan.units(e, r)] for e in range(3) for r in range(4)}
    assert all(len(d) == 3 for d in draws.values())  # ceil(12 shards / 4 readers) per epoch
    assert draws == {(e, r): [u.shard for u in plan.units(e, r)] for e in range(3) for r in range(4)}
    assert len({tuple(d) for d in draws.values()}) > 1
    flat = [s for d in draws.values() for s in d]
    assert len(set(flat)) < len(flat)  # with replacement


def test_dp_ranks_differ_and_tp_pp_peers_are_identical(easy_vqa_dir, tokenizer_dir, tokenizer):
    cfg = make_config(tokenizer_dir, data_section(easy_vqa_dir))
    keys, batches = {}, {}
    for dp_rank, peer in [(0, "a"), (0, "b"), (1, "a")]:  # a, b: two TP/PP peers of one replica
        loader = build_stream_loader(cfg, "laion", tokenizer, dp_rank, 2)
        seen = []
        for batch in take(iter(loader), 10):  # 20 samples per reader: still in epoch 0
            seen.extend(loader.last_keys)
        keys[dp_rank, peer], batches[dp_rank, peer] = seen, batch
    assert keys[0, "a"] == keys[0, "b"]
    assert all(torch.equal(batches[0, "a"][k], batches[0, "b"][k]) for k in batches[0, "a"])
    assert not set(keys[0, "a"]) & set(keys[1, "a"])


def test_fewer_shards_than_readers_still_trains(easy_vqa_dir, tokenizer_dir, tokenizer):
    data = data_section(easy_vqa_dir)
    data["laion"]["shards"] = str(easy_vqa_dir / "laion/00003.tar")
    cfg = make_config(tokenizer_dir, data)
    loader = build_stream_loader(cfg, "laion", tokenizer, 1, 2)
    batches = take(iter(loader), 8)
    assert loader.spec.plan.num_pieces == 4
    assert all(b["input_ids"].shape == (2, 32) for b in batches)


def test_a_missing_shard_is_a_one_line_error(easy_vqa_dir, tokenizer_dir, tokenizer):
    data = data_section(easy_vqa_dir)
    data["laion"]["shards"] = str(easy_vqa_dir / "laion/{00000..00099}.tar")
    cfg = make_config(tokenizer_dir, data)
    with pytest.raises(ShardNotFoundError) as err:
        build_train_loader(cfg, tokenizer, 0, 1)
    assert isinstance(err.value, ValueError)
    assert "00012.tar" in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- mixing


def test_a_step_mixes_streams_in_the_configured_ratio(easy_vqa_dir, tokenizer_dir, tokenizer):
    cfg = make_config(tokenizer_dir, data_section(easy_vqa_dir, workers=0))
    loader = build_train_loader(cfg, tokenizer, 0, 2)
    assert loader.per_step == {"laion": 2, "mmc4": 1}
    step = next(iter(loader))
    assert [mb["images"].shape[1] for mb in step] == [1, 3, 1]  # laion, mmc4, laion
    for mb, weight, seq in zip(step, [0.2, 1.0, 0.2], [32, 64, 32]):
        assert mb["images"].shape[2:] == (1, 3, 32, 32) and mb["images"].dtype == torch.float32
        assert mb["input_ids"].shape == mb["labels"].shape == mb["attention_mask"].shape == (2, seq)
        assert mb["input_ids"].dtype == mb["labels"].dtype == torch.long
        assert torch.equal(mb["loss_weight"], torch.full((2,), weight))
    assert interleave({"laion": 1, "mmc4": 1}) == ["laion", "mmc4"]  # OpenFlamingo's step
    assert interleave({"laion": 1, "mmc4": 3}) == ["mmc4", "laion", "mmc4", "mmc4"]


def test_indivisible_batch_sizes_are_config_errors(easy_vqa_dir, tokenizer_dir, tokenizer):
    cfg = make_config(tokenizer_dir, data_section(easy_vqa_dir))
    with pytest.raises(ConfigError, match="divisible"):
        build_train_loader(cfg, tokenizer, 0, 3)
