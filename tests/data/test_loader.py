"""Sharding, determinism, exact resume, layout-free global batches and per-step mixing of the loaders."""

from __future__ import annotations

import itertools

import pytest
import torch

from megaflamingo.config import ConfigError
from megaflamingo.data.dealing import canonical_count, merge_states, rank_readers, worker_readers
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
        entries = [*state["laion"]["readers"].values(), *state["mmc4"]["readers"].values()]
        assert max(e["position"]["epoch"] for e in entries) >= 1, state
        assert sum(first.skipped()["mmc4"].values()) > 0  # the rules really reject documents


# ----------------------------------------------------------------------------- elastic order


def global_batches(cfg, tokenizer, dp: int, steps: int, state=None) -> tuple[list, list, dict]:
    """The first `steps` global batches of a (dp, workers) layout, assembled from every DP rank.

    Returns ({stream: batch dict} per step, every rank's state after them, summed skip counts).
    """
    loaders = [build_train_loader(cfg, tokenizer, r, dp, state=state) for r in range(dp)]
    per_rank = [take(iter(loader), steps) for loader in loaders]
    out = []
    for t in range(steps):
        step = {}
        for name in loaders[0].streams:
            parts = [mb for r, loader in enumerate(loaders)
                     for mb, which in zip(per_rank[r][t], loader.order) if which == name]
            step[name] = {k: torch.cat([mb[k] for mb in parts]) for k in parts[0]}
        out.append(step)
    skipped: dict = {}
    for loader in loaders:
        for name, counts in loader.skipped().items():
            total = skipped.setdefault(name, {})
            for reason, n in counts.items():
                total[reason] = total.get(reason, 0) + n
    return out, [loader.state_dict() for loader in loaders], skipped


def assert_same_global(a: list, b: list) -> None:
    assert len(a) == len(b)
    for t, (step_a, step_b) in enumerate(zip(a, b)):
        assert step_a.keys() == step_b.keys()
        for name in step_a:
            for key in step_a[name]:
                assert torch.equal(step_a[name][key], step_b[name][key]), (t, name, key)


def elastic_config(root, tokenizer_dir, workers: int):
    data = data_section(root, workers=workers)
    data["laion"].update(batch_size=16, micro_batch_size=None)
    data["mmc4"].update(batch_size=8, micro_batch_size=None)
    data["canonical_readers"] = 4
    return make_config(tokenizer_dir, data)


def test_global_batches_do_not_depend_on_dp_or_workers(easy_vqa_dir, tokenizer_dir, tokenizer):
    """The same global batches (every tensor, bad samples skipped alike) on 1, 2 and 4 DP ranks
    with 0, 1, 2 and 3 workers; the rank slices differ in content."""
    steps = 6  # 4 laion samples per reader per step: readers cross into epoch 1
    want, _, skipped = global_batches(elastic_config(easy_vqa_dir, tokenizer_dir, 0), tokenizer,
                                      1, steps)
    for dp, workers in ((2, 1), (4, 2), (1, 3)):
        cfg = elastic_config(easy_vqa_dir, tokenizer_dir, workers)
        got, _, got_skipped = global_batches(cfg, tokenizer, dp, steps)
        assert_same_global(got, want)
        assert got_skipped == skipped
    assert sum(skipped["mmc4"].values()) > 0  # documents really are rejected along the way
    ids = want[0]["laion"]["input_ids"]
    assert not torch.equal(ids[:8], ids[8:])  # the halves that two DP ranks take differ


def test_a_run_resumes_on_another_layout(easy_vqa_dir, tokenizer_dir, tokenizer):
    """Stop a DP2 x 2-worker run, merge its ranks' states, continue on DP4 and on one rank."""
    cfg2 = elastic_config(easy_vqa_dir, tokenizer_dir, 2)
    want, _, _ = global_batches(elastic_config(easy_vqa_dir, tokenizer_dir, 0), tokenizer, 1, 7)
    head, states, _ = global_batches(cfg2, tokenizer, 2, 4)
    assert_same_global(head, want[:4])
    merged = merge_states(states)
    assert sorted(merged["laion"]["readers"]) == [0, 1, 2, 3]
    for dp, workers in ((4, 1), (1, 0)):
        cfg = elastic_config(easy_vqa_dir, tokenizer_dir, workers)
        tail, _, _ = global_batches(cfg, tokenizer, dp, 3, state=merged)
        assert_same_global(tail, want[4:])
    with pytest.raises(ValueError, match="lacks reader"):  # one rank's own state on another layout
        build_train_loader(cfg2, tokenizer, 3, 4, state=states[0])


def test_canonical_count_and_worker_split():
    assert canonical_count(0, {"laion": 8, "mmc4": 12}) == 4  # default: gcd of the batch sizes
    assert canonical_count(2, {"laion": 8}) == 2
    assert canonical_count(0, {"laion": 4096, "mmc4": 2048}) == 256  # capped, still a divisor
    assert canonical_count(0, {"laion": 300}) == 150
    assert worker_readers([4, 5, 6, 7, 8], 2) == [[4, 5, 6], [7, 8]]  # consecutive runs
    assert worker_readers([4, 5], 3) == [[4], [5]]  # no idle worker is started
    assert worker_readers([4, 5], 0) == [[4, 5]]  # the main process reads them all
    assert rank_readers(8, 1, 4) == [2, 3]


def test_a_state_of_another_sample_order_is_refused(easy_vqa_dir, tokenizer_dir, tokenizer):
    cfg = elastic_config(easy_vqa_dir, tokenizer_dir, 0)
    state = build_train_loader(cfg, tokenizer, 0, 2).state_dict()
    other = elastic_config(easy_vqa_dir, tokenizer_dir, 0)
    other.data.canonical_readers = 8
    with pytest.raises(ValueError, match="another sample order"):
        build_train_loader(other, tokenizer, 0, 2, state=state)
    bad = merge_states([state])
    bad["laion"]["readers"][0] = {"position": {"epoch": 9, "unit_pos": 0, "sample_pos": 0},
                                  "skipped": {}}
    with pytest.raises(ValueError, match="two different positions"):
        merge_states([state, bad])
    with pytest.raises(ConfigError, match="does not divide data.canonical_readers=4"):
        build_train_loader(elastic_config(easy_vqa_dir, tokenizer_dir, 0), tokenizer, 0, 8)
    other.data.canonical_readers = 3
    with pytest.raises(ConfigError, match="not a multiple of data.canonical_readers=3"):
        build_train_loader(other, tokenizer, 0, 1)


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
        for step in take(iter(loader), 10):  # 10 x 4 samples per rank: still in epoch 0
            seen.extend(loader.last_keys)
        keys[dp_rank, peer], batches[dp_rank, peer] = seen, step[-1]
    assert keys[0, "a"] == keys[0, "b"]
    assert all(torch.equal(batches[0, "a"][k], batches[0, "b"][k]) for k in batches[0, "a"])
    assert not set(keys[0, "a"]) & set(keys[1, "a"])


def test_fewer_shards_than_readers_still_trains(easy_vqa_dir, tokenizer_dir, tokenizer):
    data = data_section(easy_vqa_dir)
    data["laion"]["shards"] = str(easy_vqa_dir / "laion/00003.tar")
    cfg = make_config(tokenizer_dir, data)
    loader = build_stream_loader(cfg, "laion", tokenizer, 1, 2)
    steps = take(iter(loader), 8)
    assert loader.spec.plan.num_pieces == 4  # 4 canonical readers (gcd of 8 and 4), 1 shard
    assert all(len(s) == 2 and all(b["input_ids"].shape == (2, 32) for b in s) for s in steps)


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
