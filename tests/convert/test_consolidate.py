"""Consolidating DeepSpeed training checkpoints read from their files is exact: TP2 x PP2 x DP2
ZeRO-1 (8 gloo ranks) and TP2 x DP2 ZeRO-3 (4 ranks) give the very tensors the same runs gather in
memory (`gather_trainable_state`), bit for bit. One spawn per layout.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from megaflamingo.convert.consolidate import (
    ConsolidationError,
    checkpoint_layout,
    consolidate,
    merge_tp,
    split_tp,
    trainable_shapes,
)
from tests.convert.ds_runs import save_and_gather
from tests.parallel.harness import run_ranks

LAYOUTS = {  # tag: (world, tp, pp, zero, expected file layout)
    "tp2-pp2-dp2-zero1": (8, 2, 2, 1, "pipeline"),
    "tp2-dp2-zero3": (4, 2, 1, 3, "zero3"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_ckpt")
    gathered = {}
    for tag, (world, tp, pp, zero, _) in LAYOUTS.items():
        per_rank = run_ranks(save_and_gather, world, "llama", tp, pp, zero, str(root), tag)
        union = {}
        for state in per_rank:  # pipeline ranks hold their stage's share
            union.update(state)
        gathered[tag] = union
    return root, gathered


@pytest.fixture(scope="module")
def expected_shapes():
    from tests.parallel.cases import build_tiny_model

    return trainable_shapes(build_tiny_model("llama"))


@pytest.mark.parametrize("tag", list(LAYOUTS))
def test_consolidated_equals_gathered_in_memory(saved, expected_shapes, tag):
    root, gathered = saved
    assert checkpoint_layout(root / tag) == LAYOUTS[tag][4]
    state = consolidate(root / tag, expected_shapes)
    assert state.keys() == gathered[tag].keys() == expected_shapes.keys()
    for name, tensor in state.items():
        assert tensor.dtype == gathered[tag][name].dtype, name
        assert torch.equal(tensor, gathered[tag][name]), name


def test_missing_or_truncated_files_are_one_line_errors(saved, expected_shapes, tmp_path):
    root, _ = saved
    broken = tmp_path / "zero3-missing"
    shutil.copytree(root / "tp2-dp2-zero3", broken)
    (broken / "zero_pp_rank_1_mp_rank_01_optim_states.pt").unlink()
    with pytest.raises(ConsolidationError, match="zero_pp_rank_1_mp_rank_01_optim_states.pt"):
        consolidate(broken, expected_shapes)
    cut = tmp_path / "pipeline-cut"
    shutil.copytree(root / "tp2-pp2-dp2-zero1", cut)
    victim = cut / "layer_01-model_01-model_states.pt"
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(ConsolidationError, match="cannot read .*layer_01-model_01-model_states.pt"):
        consolidate(cut, expected_shapes)
    wrong = dict(expected_shapes, **{"xattn.9.to_q.weight": torch.Size([4, 4])})
    with pytest.raises(ConsolidationError, match="lacks trainable parameter 'xattn.9.to_q.weight'"):
        consolidate(root / "tp2-dp2-zero3", wrong)


def test_split_is_the_inverse_of_merge():
    full = torch.arange(7 * 5 * 2, dtype=torch.float32).view(14, 5)
    for name, dim in (("xattn.0.to_kv.weight", 0), ("xattn.0.to_q.weight", 0), ("xattn.0.to_out.weight", 1)):
        shards = [split_tp(name, full, r, 2, dim) for r in range(2)]
        assert torch.equal(merge_tp(name, shards, full.shape), full)
    kv = [split_tp("xattn.0.to_kv.weight", full, r, 2, 0) for r in range(2)]
    assert torch.equal(kv[0], torch.cat([full[0:4], full[7:11]]))  # each half sharded on its own (7 = 4 + 3)


def test_convert_reads_a_run_directory_into_the_model(saved, tmp_path):
    """What `to-hf --checkpoint RUN` does: find the newest step of a run, fill the model from it."""
    from megaflamingo.convert.commands import load_training_checkpoint, resolve_step_dir
    from tests.parallel.cases import build_tiny_model

    root, gathered = saved
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    shutil.copytree(root / "tp2-dp2-zero3", step)
    (step.parent / "latest").write_text(step.name)
    assert resolve_step_dir(tmp_path / "run") == step
    model = build_tiny_model("llama")
    loaded = load_training_checkpoint(model, resolve_step_dir(tmp_path / "run"))
    params = dict(model.named_parameters())
    assert sorted(loaded) == sorted(gathered["tp2-dp2-zero3"])
    assert all(torch.equal(params[n], gathered["tp2-dp2-zero3"][n]) for n in loaded)
