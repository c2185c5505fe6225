"""Rank-local building (parallel/materialize.py): each rank's tensors equal the slices of the full
model for every LM family, each checkpoint slice is read once, bad shards are one-line errors, and
the building memory of SmolLM2-135M shrinks with the shard (measured in fresh processes)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megaflamingo.config import KernelsConfig, LMConfig, ModelConfig, PerceiverConfig, VisionConfig, XAttnConfig
from megaflamingo.models.flamingo import build_model
from megaflamingo.parallel.materialize import build_rank_model, stage_of
from megaflamingo.parallel.plan import apply_tensor_parallel
from megaflamingo.parallel.topology import ParallelDims, build_groups
from tests.assets import TINY_VISION

ROOT = Path(__file__).resolve().parents[2]
ADDED = 3  # <|endofchunk|>, <image>, <PAD> past the checkpoint's rows: mean rows


def lm_model_config(lm_dir: str | Path, vocab_ck: int | None = None, **kw) -> ModelConfig:
    """A Flamingo around the checkpoint at `lm_dir` with a tiny tower and 2 new token rows."""
    if vocab_ck is None:
        vocab_ck = json.loads((Path(lm_dir) / "config.json").read_text())["vocab_size"]
    return ModelConfig(
        vision=VisionConfig(open_clip_config=TINY_VISION), lm=LMConfig(hf_path=str(lm_dir)),
        cross_attn_every_n_layers=2, perceiver=PerceiverConfig(depth=1, heads=2, dim_head=16, num_latents=4, ff_mult=2),
        xattn=XAttnConfig(heads=6, dim_head=8, ff_mult=2), kernels=KernelsConfig(xattn="reference"),
        vocab_size=vocab_ck + ADDED, eoc_token_id=vocab_ck, media_token_id=vocab_ck + 1,
        pad_token_id=vocab_ck + 2, **kw)


def stage_parts(cfg: ModelConfig, pp: int) -> list[int]:
    """Equal numbers of decoder layers per stage: [0, ..., L + 2] over [embed, L blocks, head]."""
    from megaflamingo.models.hf_weights import lm_config_from_hf

    L = lm_config_from_hf(cfg.lm.hf_path).num_layers
    return [0, *(1 + L * s // pp for s in range(1, pp)), L + 2]


@pytest.fixture
def fake_rank():
    """fake_rank(dims, rank) -> ProcessGroups of one rank of `dims`, without its peers (collectives
    are no-ops); the group is torn down after the test."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    def make(dims: ParallelDims, rank: int):
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=dims.world_size)
        return build_groups(dims)

    yield make
    if dist.is_initialized():
        dist.destroy_process_group()


def _compare(mine: torch.nn.Module, want: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> list[str]:
    bad = []
    for name, param in mine.named_parameters():
        if param.device.type == "meta" or name.startswith(skip):
            continue
        ref = want[name]
        if param.shape != ref.shape or not torch.allclose(param, ref, rtol=0, atol=1e-6):
            bad.append(name)
    return bad


VARIANTS = ["llama_gqa", "llama_tied", "mpt", "gpt_neox_parallel", "qwen2_untied"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_rank_holds_the_slices_of_the_full_model(variant, tmp_path, fake_rank):
    """TP2 ranks and PP2 stages against today's path (the full model, then the TP plan): frozen
    tensors equal the full checkpoint-loaded model's slices, trainable ones the TP1 build's."""
    from tests.hf_models import save_tiny_hf_lm

    lm_dir = save_tiny_hf_lm(variant, tmp_path / variant)
    tower = tmp_path / "tower.pt"
    torch.manual_seed(1)
    cfg = lm_model_config(lm_dir)
    torch.save(build_model(cfg).vision.visual.state_dict(), tower)  # a real tower checkpoint
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, weights=str(tower)))
    one, reader = build_rank_model(cfg)
    assert _compare(one, {n: p for n, p in build_model(cfg).named_parameters() if not p.requires_grad} |
                    {n: p for n, p in one.named_parameters() if p.requires_grad}) == []
    assert len(set(reader.reads)) == len(reader.reads)  # no slice read twice
    for rank in range(2):
        groups = fake_rank(ParallelDims(tp=2), rank)
        mine, reader = build_rank_model(cfg, groups)
        full = dict(apply_tensor_parallel(build_model(cfg), groups).named_parameters())
        ref_one, _ = build_rank_model(cfg)
        trainable = dict(apply_tensor_parallel(ref_one, groups).named_parameters())
        want = {n: (trainable[n] if p.requires_grad else full[n]) for n, p in mine.named_parameters()}
        # the mean rows need the peers' sums (a fake group sums nothing): rows of the other tests
        assert _compare(mine, want, skip=("lm.embed_tokens", "lm.lm_head")) == []
        assert len(set(reader.reads)) == len(reader.reads)
        held = sum(p.numel() for p in mine.parameters())
        assert held < sum(p.numel() for p in one.parameters())
    parts = stage_parts(cfg, 2)
    for stage in range(2):
        groups = fake_rank(ParallelDims(pp=2), stage)
        mine, _ = build_rank_model(cfg, groups, parts)
        L = len(mine.lm.layers)
        for name, param in mine.named_parameters():
            own = parts[stage] <= stage_of(name, L) < parts[stage + 1]
            tied_head = name.startswith("lm.embed_tokens") and mine.lm.lm_head is None and stage == 1
            assert (param.device.type != "meta") == (own or tied_head), name
        assert _compare(mine, dict(one.named_parameters())) == []


@pytest.mark.distributed
def test_vocab_rows_past_the_checkpoint_are_the_mean_row_on_every_tp_rank(tmp_path):
    """Real gloo TP2 (the mean row is a sum over both ranks' rows): embedding and head shards
    equal the full model's rows, mean rows included."""
    from tests.hf_models import save_tiny_hf_lm

    lm_dir = save_tiny_hf_lm("llama_gqa", tmp_path / "lm")
    script = ROOT / "tests/parallel/materialize_ranks.py"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(script), str(lm_dir)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("rank ok") == 2


def test_missing_or_truncated_shard_is_one_line_naming_the_file(tmp_path):
    from megaflamingo.models.hf_slices import SliceReader
    from tests.hf_models import save_tiny_hf_lm

    lm_dir = save_tiny_hf_lm("mpt", tmp_path / "lm")
    shard = lm_dir / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as info:
        build_rank_model(lm_model_config(lm_dir))
    assert str(shard) in str(info.value) and "truncated" in str(info.value) and "\n" not in str(info.value)
    shard.write_bytes(data)
    index = {"metadata": {}, "weight_map": {n: "model-00002-of-00002.safetensors" for n in
                                            SliceReader(lm_dir).names()}}
    (lm_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError) as info:
        build_rank_model(lm_model_config(lm_dir))
    assert "model-00002-of-00002.safetensors is missing" in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- memory, SmolLM2


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    from megaflamingo.convert.gguf import gguf_to_hf_dir, smollm2_gguf

    try:
        gguf = smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return gguf_to_hf_dir(gguf, tmp_path_factory.mktemp("smollm2") / "smollm2")


def _peak(lm_dir: Path, *args: str) -> dict:
    # A fixed mmap threshold: every tensor gets fresh pages and returns them when freed (glibc's
    # dynamic threshold would let a build reuse memory freed by the imports, unseen by RSS).
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-m", "tests.parallel.build_rss", "--lm", str(lm_dir), *args],
                         env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_building_memory_shrinks_with_the_shard(smollm2):
    """Peak RSS of the build alone, each in a fresh process: TP per rank and PP2 per stage against
    one rank building everything, and against the old full-model-then-slice path; TP3 also through
    the training path's entry. SmolLM2 has 9 query / 3 key-value heads, so TP2 is illegal: TP3 is
    the smallest tensor-parallel layout."""
    old = _peak(smollm2, "--full")
    one = _peak(smollm2)
    tp3 = [_peak(smollm2, "--tp", "3", "--rank", "0")]  # rank 0 holds the most vocabulary rows
    pp2 = [_peak(smollm2, "--pp", "2", "--rank", str(r)) for r in range(2)]
    trained = _peak(smollm2, "--training", "--tp", "3", "--rank", "0")  # training's own entry
    mib = lambda r: f"{r['peak_bytes'] / 2**20:.0f} MiB"  # noqa: E731
    print(f"SmolLM2-135M build peak RSS: old full path {mib(old)}, TP1 {mib(one)}, "
          f"TP3 {[mib(r) for r in tp3]}, PP2 {[mib(r) for r in pp2]}; parameters held: TP1 {one['params']}, "
          f"TP3 {[r['params'] for r in tp3]}, PP2 {[r['params'] for r in pp2]}; "
          f"TP3 through build_rank_local_model {mib(trained)}")
    assert one["peak_bytes"] <= 1.1 * one["bytes"]  # the weights once: no second full copy
    assert one["peak_bytes"] <= 0.6 * old["peak_bytes"]
    for r in [*tp3, trained]:
        assert r["peak_bytes"] <= 0.6 * one["peak_bytes"]
    for r in pp2:
        assert r["peak_bytes"] <= 0.6 * old["peak_bytes"]
        # a stage holds half the layers plus the 49k-row embedding (tied: on both stages), 60.5%
        # of the weights, so against TP1 the bound is the weights' share, not 0.6
        assert r["peak_bytes"] <= 1.05 * r["params"] / one["params"] * one["peak_bytes"]


@pytest.mark.parametrize("family", ["llama", "mpt", "gpt_neox"])
def test_inline_lm_ranks_equal_the_slices_of_the_one_rank_build(family, fake_rank):
    """No checkpoint: every value comes from the (seed, name) init, so a TP2 rank equals the TP1
    build with the TP plan applied, frozen and trainable alike."""
    from tests.parallel.cases import model_config

    cfg = model_config(family)
    for rank in range(2):
        groups = fake_rank(ParallelDims(tp=2), rank)
        mine, reader = build_rank_model(cfg, groups, seed=3)
        one, _ = build_rank_model(cfg, seed=3)
        assert reader is None
        assert _compare(mine, dict(apply_tensor_parallel(one, groups).named_parameters())) == []
        other, _ = build_rank_model(cfg, groups, seed=4)
        assert _compare(other, dict(mine.named_parameters()), skip=("lm.", "vision.")) != []  # the seed matters


def test_frozen_weights_in_bf16_trainable_in_fp32(tmp_path, fake_rank):
    from tests.hf_models import save_tiny_hf_lm

    cfg = lm_model_config(save_tiny_hf_lm("llama_gqa", tmp_path / "lm"))
    groups = fake_rank(ParallelDims(tp=2), 1)
    fp32, _ = build_rank_model(cfg, groups)
    bf16, _ = build_rank_model(dataclasses.replace(cfg, frozen_dtype="bf16"), groups)
    want = dict(fp32.named_parameters())
    for name, param in bf16.named_parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16), name
        assert torch.equal(param, want[name].to(param.dtype)), name


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_openflamingo_import_into_a_sharded_build_is_one_line_config_error(tp, pp, fake_rank, tmp_path):
    """Importing a released checkpoint needs the whole model, which no rank of tp or pp > 1 holds:
    training refuses before anything is built or read (the file need not exist)."""
    from megaflamingo.builder import build_training_model
    from megaflamingo.config import ConfigError
    from tests.parallel.cases import run_config

    cfg = run_config("llama", tp=tp, pp=pp)
    model_cfg = dataclasses.replace(cfg.model, openflamingo_checkpoint=str(tmp_path / "of.pt"))
    cfg = dataclasses.replace(cfg, model=model_cfg)
    groups = fake_rank(ParallelDims(tp=tp, pp=pp), 0)
    with pytest.raises(ConfigError, match=f"tp={tp} pp={pp}") as err:
        build_training_model(cfg, groups)
    assert "\n" not in str(err.value)
