"""The training path builds only each rank's share: `launcher/pretrain.py` under the real `deepspeed`
launcher, TP2 x PP2 on 4 CPU ranks, a Hugging Face safetensors LM (tiny LLaMA, tied head, 256
checkpoint rows for a 260-token vocabulary: the mean rows are summed over the TP group).

`rank_local_probe.py` runs the launcher unchanged and records, the moment
`builder.build_training_model` returns on a rank (before its engine exists), every parameter's
value or "meta", and every slice read from the safetensors files. Then, for every rank:
- it holds exactly its pipeline stage's parameters (the tied embedding on the last stage too),
  every other one is on the meta device;
- each held tensor is this rank's TP slice of the single-process model of the same seed
  (`models.flamingo.build_model(cfg, seed=train.seed)`), at the TP shape;
- each checkpoint slice was read once, and the elements read are exactly the checkpoint rows of
  the frozen LM tensors the rank holds (no full tensor of a sharded weight, nothing of another stage);
and the run trains its steps.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.assets import make_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT_ROWS = 256
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[list[str], Path, Path]:
    """(overrides, probe dir, run dir) of one TP2 x PP2 launch, 2 steps."""
    from megaflamingo.data.easyvqa import write_easy_vqa
    from tests.hf_models import save_tiny_hf_lm

    base = tmp_path_factory.mktemp("rank_local")
    tok = make_bpe_tokenizer(base / "tok", vocab_size=257)
    write_easy_vqa(base / "data", limit=60, shard_size=30)
    lm = save_tiny_hf_lm("llama_tied", base / "lm", vocab_size=CHECKPOINT_ROWS)
    overrides = [f"model.tokenizer={tok}", f"model.lm.hf_path={lm}", f"data.laion.shards={base}/data/laion/*.tar",
                 f"data.mmc4.shards={base}/data/mmc4/*.tar", "data.mmc4_options.min_image_bytes=0",
                 "data.laion.batch_size=4", "data.mmc4.batch_size=4", "data.mmc4.seq_len=32", "data.workers=1",
                 "parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1", "train.precision=fp32",
                 "train.steps=2", "checkpoint.every=0", "logging.tensorboard=false", f"train.output_dir={base}/run"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", MF_PROBE_DIR=str(base / "probe"))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "4", "--master_port",
           str(29500 + (os.getpid() + 71) % 1000), "tests/integration/rank_local_probe.py",
           "--config", "configs/tiny.yaml", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return overrides, base / "probe", base / "run"


@pytest.fixture(scope="module")
def single(run):
    """The single-process model of the run's config and seed, and that config."""
    from megaflamingo.config import load_config
    from megaflamingo.models.flamingo import build_model
    from megaflamingo.resolve import resolve_model

    cfg = load_config(ROOT / "configs/tiny.yaml", run[0])
    model_cfg = resolve_model(cfg.model)
    return build_model(model_cfg, seed=cfg.train.seed), model_cfg


def _records(probe: Path) -> list[dict]:
    return [torch.load(probe / f"rank{r}.pt", weights_only=False) for r in range(4)]


def _held(name: str, record: dict, num_layers: int, tied: bool) -> bool:
    """Whether the rank of `record` should hold parameter `name` (its stage; tied: the embedding
    on the last stage too)."""
    from megaflamingo.parallel.materialize import stage_of

    parts, stage = record["rank_shard"]["parts"], record["coords"]["pp_rank"]
    mine = range(parts[stage], parts[stage + 1])
    tied_last = tied and num_layers + 1 in mine
    return stage_of(name, num_layers) in mine or (tied_last and name.startswith("lm.embed_tokens."))


def _slice(full: torch.Tensor, spans: list[tuple[int, int, int]]) -> torch.Tensor:
    if not spans:
        return full
    return torch.cat([full.narrow(dim, a, b - a) for dim, a, b in spans], dim=spans[0][0])


def test_the_run_trains(run):
    from megaflamingo.training.metrics import read_metrics

    losses = [r["loss"] for r in read_metrics(run[2] / "metrics.jsonl")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses


def test_each_rank_holds_its_stage_at_tp_shapes_with_the_single_process_values(run, single):
    from megaflamingo.parallel.materialize import local_spans, tp_styles

    model, _ = single
    whole, styles = dict(model.named_parameters()), tp_styles(model)
    num_layers, tied = len(model.lm.layers), model.lm.lm_head is None
    total = sum(p.numel() for p in whole.values())
    for record in _records(run[1]):
        coords = record["coords"]
        assert record["rank_shard"]["tp"] == 2 and record["rank_shard"]["tp_rank"] == coords["tp_rank"]
        assert record["rank_shard"]["stage"] == coords["pp_rank"]
        assert set(record["params"]) == set(whole)
        for name, value in record["params"].items():
            if not _held(name, record, num_layers, tied):
                assert isinstance(value, str) and value == "meta", (coords, name)
                continue
            spans = local_spans(styles[name], tuple(whole[name].shape), 2, coords["tp_rank"])
            want = _slice(whole[name].detach(), spans)
            assert isinstance(value, torch.Tensor), (coords, name)
            assert value.shape == want.shape and value.dtype == want.dtype, (coords, name, value.shape, want.shape)
            torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-7, msg=f"{coords} {name}")
        held = sum(v.numel() for v in record["params"].values() if isinstance(v, torch.Tensor))
        assert held < total, (coords, held, total)  # never the whole model


def test_each_checkpoint_slice_is_read_once_and_only_the_ranks_rows(run, single):
    from megaflamingo.models.hf_slices import SliceReader
    from megaflamingo.parallel.materialize import local_spans, tp_styles

    model, model_cfg = single
    whole, styles = dict(model.named_parameters()), tp_styles(model)
    num_layers, tied = len(model.lm.layers), model.lm.lm_head is None
    hidden = model_cfg.lm.hidden_size
    checkpoint = SliceReader(model_cfg.lm.hf_path)
    shape_of = {name: checkpoint.shape(name) for name in checkpoint.names()}
    for record in _records(run[1]):
        coords = record["coords"]
        reads = [(name, tuple(map(tuple, spans))) for reader in record["reads"] for name, spans in reader]
        assert reads and len(set(reads)) == len(reads), (coords, reads)
        read = sum(math.prod([b - a for a, b in spans] + shape_of[name][len(spans):]) for name, spans in reads)
        expected = 0  # the checkpoint part of every frozen LM tensor the rank holds
        for name, param in whole.items():
            if not name.startswith("lm.") or param.requires_grad or not _held(name, record, num_layers, tied):
                continue
            shape = local_spans(styles[name], tuple(param.shape), 2, coords["tp_rank"])
            numel = _slice(param.detach(), shape).numel()
            if name in ("lm.embed_tokens.weight", "lm.lm_head.weight"):  # rows past the checkpoint's: mean rows
                a, b = (shape[0][1], shape[0][2]) if shape else (0, param.shape[0])
                numel -= max(0, b - max(a, CHECKPOINT_ROWS)) * hidden
            expected += numel
        assert read == expected, (coords, read, expected)
