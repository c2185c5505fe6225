"""benchmarks/tflops.py: runs end to end on CPU through the training step function and reports every
field (no timing assertions); the device-sized default it runs without arguments."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megaflamingo.config import ConfigError
from megaflamingo.models.flops import count_flops
from tests.benchmarks import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "tflops.py"
RUN_FIELDS = ("step_s", "forward_s", "backward_s", "optimizer_s", "tokens_per_s", "samples_per_s",
              "images_per_s", "tflops_true", "tflops_6n_all", "tflops_hardware", "peak_memory_gib")


def load_script():
    return load_benchmark("tflops")


def check_report(report: dict, runs: tuple[str, ...]) -> None:
    assert set(report["runs"]) == set(runs)
    for key in ("device", "versions", "flops", "seq_len", "num_media", "micro_batch", "date", "peak_source"):
        assert key in report, key
    assert report["versions"]["torch"]
    assert report["peak_tflops"] is None  # CPU: no MFU
    for name, run in report["runs"].items():
        for key in RUN_FIELDS:
            assert math.isfinite(run[key]) and run[key] > 0, (name, key, run[key])
        assert run["mfu"] is None and run["hfu"] is None and run["mfu_6n_all"] is None
        assert run["losses_finite"] and math.isfinite(run["loss_last"])
        # the conventions order the same way whatever the timing
        assert run["tflops_6n_all"] > run["tflops_true"] == run["tflops_hardware"]
        assert run["tokens_per_s"] == pytest.approx(run["samples_per_s"] * report["seq_len"])
        assert run["images_per_s"] == pytest.approx(run["samples_per_s"] * report["num_media"])


def test_cli_on_tiny_config_through_the_engine(tmp_path: Path) -> None:
    """The command line, in its own process (DeepSpeed initialises a one-rank world there)."""
    out = tmp_path / "tflops.json"
    cmd = [sys.executable, str(SCRIPT), "--config", "configs/tiny.yaml", "--steps", "3", "--warmup", "1",
           "--json", str(out)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    check_report(report, ("megaflamingo",))
    assert "DeepSpeed engine via training.engine.build_engine + training.step" in \
        report["runs"]["megaflamingo"]["trainer"]
    assert "true TFLOP/s" in proc.stdout and "megaflamingo" in proc.stdout


@pytest.mark.skipif(importlib.util.find_spec("open_flamingo") is None, reason="open-flamingo not installed")
def test_openflamingo_baseline_beside_ours(tmp_path: Path) -> None:
    """Both trainers in one process, two micro-batches per step of the laion stream."""
    out = tmp_path / "both.json"
    cmd = [sys.executable, str(SCRIPT), "--config", "configs/tiny.yaml", "--steps", "2", "--warmup", "0",
           "--accum", "2", "--stream", "laion", "--baseline", "openflamingo", "--json", str(out)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    check_report(report, ("megaflamingo", "open_flamingo"))
    assert (report["seq_len"], report["num_media"], report["accum"]) == (16, 1, 2)
    assert "create_model_and_transforms" in report["runs"]["open_flamingo"]["trainer"]
    assert report["speedup_vs_baseline"] > 0 and "open_flamingo samples/s" in proc.stdout


def test_without_arguments_a_default_sized_to_the_device(tmp_path: Path) -> None:
    bench = load_script()
    args = bench.parse_args([])
    assert args.config is None and args.baseline == "openflamingo"
    cfg, notes, name = bench.default_config(torch.device("cpu"), ["model.lm.num_layers=4"])
    m, mmc4 = cfg.model, cfg.data.mmc4
    assert name == "default-cpu" and "no --config" in notes[0]
    assert (m.lm.family, m.lm.hidden_size, m.lm.num_layers, m.cross_attn_every_n_layers) == ("llama", 512, 4, 2)
    assert (m.vocab_size, m.lm.vocab_size, m.media_token_id) == (32003, 32000, 32001)
    assert (mmc4.micro_batch_size, mmc4.seq_len, mmc4.max_num_media) == (2, 256, 5)
    assert count_flops(m, mmc4.seq_len, mmc4.max_num_media).true > 0
    batch = bench.synthetic_batch(cfg, 2, 256, 5, torch.device("cpu"))
    assert batch["images"].shape == (2, 5, 1, 3, 64, 64)
    if importlib.util.find_spec("open_flamingo") is not None:  # the baseline builds at these shapes too
        small, _, _ = bench.default_config(torch.device("cpu"), ["model.lm.num_layers=2"])
        baseline = bench._sibling("openflamingo_baseline").OpenFlamingoTrainer(small, torch.device("cpu"), tmp_path)
        assert baseline.forward({k: v[:1] for k, v in batch.items()}).isfinite()


def test_released_configs_get_known_shapes_without_files():
    bench = load_script()
    cfg, notes = bench.benchmark_config(str(ROOT / "configs/openflamingo-9b.yaml"), [])
    m = cfg.model
    assert m.lm.hf_path is None and m.vision.weights is None and m.tokenizer is None
    assert (m.lm.family, m.lm.hidden_size, m.lm.num_layers, m.lm.tie_word_embeddings) == ("mpt", 4096, 32, True)
    assert (m.vocab_size, m.eoc_token_id, m.media_token_id, m.pad_token_id) == (50280, 50277, 50278, 50279)
    assert cfg.data.mmc4.shards is None and any("mpt-7b" in n for n in notes)
    # the substituted shapes are the worked example's (perf_anchors §1.3): 9.76 TF per MMC4 sample
    assert count_flops(m, 256, 6).true / 1e12 == pytest.approx(9.76, rel=0.005)
    for name in ("openflamingo-3b", "openflamingo-4b"):
        cfg, _ = bench.benchmark_config(str(ROOT / f"configs/{name}.yaml"), ["model.lm.num_layers=2"])
        assert cfg.model.lm.num_layers == 2 and cfg.model.vocab_size == 50280
    with pytest.raises(ConfigError, match="KNOWN_LMS"):
        bench.benchmark_config(str(ROOT / "configs/openflamingo-9b.yaml"), ["model.lm.hf_path=lm/unknown-lm"])
    cfg, _ = bench.benchmark_config(str(ROOT / "configs/tiny.yaml"), ["model.lm.hf_path=lm/mpt-1b-redpajama-200b"])
    assert (cfg.model.lm.hidden_size, cfg.model.lm.num_layers) == (2048, 24)  # overridden paths too


def test_a_failing_baseline_is_reported_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_script()

    class OutOfMemory:
        def OpenFlamingoTrainer(self, *args: object) -> None:  # noqa: N802 (the attribute the script looks up)
            raise RuntimeError("CUDA out of memory. Tried to allocate 1 PiB")

    monkeypatch.setattr(bench, "_sibling", lambda name: OutOfMemory())
    cfg, _ = bench.benchmark_config(str(ROOT / "configs/tiny.yaml"), [])
    args = bench.parse_args(["--config", "x", "--steps", "1", "--micro-batch", "1"])
    row = bench.run_baseline(cfg, args, {}, count_flops(cfg.model, 16, 1), None, torch.device("cpu"))
    assert row["error"].startswith("RuntimeError: CUDA out of memory") and "samples_per_s" not in row


def test_3d_example_fits_its_hostfile():
    """configs/llama3-70b-3d.yaml on hostfiles/h100-8nodes: TP inside a node, PP across nodes."""
    from megaflamingo.resolve import batch_layout, check_layout

    bench = load_script()
    cfg, notes = bench.benchmark_config(str(ROOT / "configs/llama3-70b-3d.yaml"), [])
    lm = cfg.model.lm
    assert (lm.family, lm.hidden_size, lm.num_layers, lm.num_kv_heads) == ("llama", 8192, 80, 8)
    assert cfg.model.vocab_size == 128256 + 3 and any("Meta-Llama-3-70B" in n for n in notes)
    lines = [ln.split() for ln in (ROOT / "hostfiles/h100-8nodes").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    slots = [int(slot.split("=")[1]) for _, slot in lines]
    dims = check_layout(cfg, sum(slots))
    assert (dims.tp, dims.pp, dims.dp) == (8, 4, 2)
    node_of = [n for n, k in enumerate(slots) for _ in range(k)]
    for group in dims.groups("tp"):
        assert len({node_of[r] for r in group}) == 1  # a TP group never leaves its node
    for group in dims.groups("pp"):
        assert len({node_of[r] for r in group}) == dims.pp  # each stage on other nodes
    for stream in (cfg.data.laion, cfg.data.mmc4):
        micro, gas = batch_layout(stream.batch_size, dims, stream.micro_batch_size)
        assert micro == stream.micro_batch_size and gas == 32
    with pytest.raises(ConfigError, match="does not divide the world size"):
        check_layout(cfg, 48)
