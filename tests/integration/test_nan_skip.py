"""A step whose loss is NaN is skipped on every rank and counted; parameters do not move.

Every ZeRO stage on one rank, and a 2-stage pipeline (ZeRO-0 and -1) on 2 ranks through the real
deepspeed launcher, where DeepSpeed steps the optimizer inside its own schedule.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megaflamingo.training.metrics import read_metrics
from tests.assets import make_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

# The real launcher entry point, with a loader whose second step carries NaN images.
SCRIPT = r"""
import os, sys, torch
sys.path.insert(0, os.getcwd())  # the repository root
import megaflamingo.data.loader as loader_module

class NaNOnSecondStep:
    def __init__(self, inner):
        self.inner = inner
    def __getattr__(self, name):
        return getattr(self.inner, name)
    def __iter__(self):
        for i, micro_batches in enumerate(self.inner):
            if i == 1:
                micro_batches[0]["images"] = torch.full_like(micro_batches[0]["images"], float("nan"))
            yield micro_batches

build = loader_module.build_train_loader
loader_module.build_train_loader = lambda *a, **k: NaNOnSecondStep(build(*a, **k))
sys.argv = ["pretrain.py", *sys.argv[1:]]  # the launcher's --local_rank included
import runpy
runpy.run_path("launcher/pretrain.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    from megaflamingo.data.easyvqa import write_easy_vqa

    base = tmp_path_factory.mktemp("nan")
    tok = make_bpe_tokenizer(base / "tok", vocab_size=257)
    write_easy_vqa(base / "data", limit=40, shard_size=20)
    script = base / "nan_on_second_step.py"
    script.write_text(SCRIPT)
    return base, tok, script


def _args(assets: tuple[Path, Path, Path], out: Path, *extra: str) -> list[str]:
    """pretrain.py arguments: tiny.yaml on the easy-vqa shards, 3 steps, a checkpoint after each."""
    base, tok, _ = assets
    return ["--config", "configs/tiny.yaml", f"model.tokenizer={tok}",
            f"data.laion.shards={base}/data/laion/*.tar", f"data.mmc4.shards={base}/data/mmc4/*.tar",
            "data.mmc4_options.min_image_bytes=0", "data.laion.batch_size=2", "data.mmc4.batch_size=2",
            "data.mmc4.seq_len=64", "train.steps=3", "checkpoint.every=1", "checkpoint.keep_last=3",
            f"train.output_dir={out}", *extra]


def _env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("RANK", None)
    return env


def _trainable(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every trainable tensor of a checkpoint, whatever its layout (plain, ZeRO-3, pipeline)."""
    layers = sorted(ckpt.glob("layer_*-model_states.pt"))
    if layers:  # pipeline: one file per layer, frozen entries excluded
        return {f"{f.name}:{k}": v for f in layers for k, v in torch.load(f, weights_only=False).items()}
    plain = ckpt / "mp_rank_00_model_states.pt"  # ZeRO-0/1/2 hold the weights whole
    if plain.is_file():
        return torch.load(plain, weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


@pytest.mark.parametrize("zero,pp", [(0, 1), (1, 1), (2, 1), (3, 1), (0, 2), (1, 2)],
                         ids=["zero0", "zero1", "zero2", "zero3", "pp2-zero0", "pp2-zero1"])
def test_nan_step_is_skipped_and_counted(assets: tuple[Path, Path, Path], zero: int, pp: int) -> None:
    base, tok, script = assets
    out = base / f"run-z{zero}-pp{pp}"
    args = _args(assets, out, f"parallel.zero_stage={zero}", f"parallel.pp={pp}", "optim.lr=1e-2")
    env = _env()
    if pp == 1:
        cmd = [sys.executable, str(script), *args]
    else:  # one rank per stage, under the deepspeed launcher
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(pp),
               "--master_port", str(29600 + os.getpid() % 300 + zero), str(script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    records = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    assert [records[s]["skipped_steps"] for s in (1, 2, 3)] == [0, 1, 1]
    assert records[2]["loss"] != records[2]["loss"] or records[2]["loss"] in ("nan", "inf")  # NaN logged
    for step in (1, 3):  # per-stream losses on every layout, pipeline included
        assert all(records[step][f"loss_{s}"] == records[step][f"loss_{s}"] for s in ("laion", "mmc4"))
        total = 0.2 * records[step]["loss_laion"] + records[step]["loss_mmc4"]  # tiny.yaml's multipliers
        assert records[step]["loss"] == pytest.approx(total, rel=1e-6)

    one, two, three = (_trainable(out / "checkpoints" / f"step_{s:08d}") for s in (1, 2, 3))
    assert one.keys() == two.keys() == three.keys() and one
    assert all(torch.equal(one[k], two[k]) for k in one), "a skipped step moved parameters"
    assert any(not torch.equal(two[k], three[k]) for k in two), "training stopped after the skip"
    assert all(torch.isfinite(v).all() for v in three.values())
    if pp == 1:  # what evaluation loads: the same tensors, whatever the ZeRO stage
        from megaflamingo.config import load_config
        from megaflamingo.builder import build_model
        from megaflamingo.training.checkpoint import load_trainable_weights

        model = build_model(load_config(ROOT / "configs/tiny.yaml", [f"model.tokenizer={tok}"]).model)
        names = load_trainable_weights(model, out / "checkpoints" / "step_00000003")
        params, saved = dict(model.named_parameters()), {k.removeprefix("model."): v for k, v in three.items()}
        assert names and all(torch.equal(params[n], saved[n]) for n in names)


def test_too_many_nan_steps_in_a_row_abort_with_one_line(assets: tuple[Path, Path, Path]) -> None:
    base, _, script = assets
    out = base / "run-abort"
    args = _args(assets, out, "train.max_skipped_steps_in_a_row=0")
    proc = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(errors) == 1 and "1 steps in a row had a NaN/Inf loss (step 2;" in errors[0]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000001"]  # nothing after
