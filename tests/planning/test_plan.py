"""launcher/plan.py and megaflamingo.planning: counts against an analytic count, FLOPs against
models/flops.py, memory against a measured training step, one-line exit-2 errors."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megaflamingo.models.flops import count_flops
from megaflamingo.parallel.layers import shard_bounds
from megaflamingo.planning import GiB, PlanError, build_plan, check_fits, format_plan, load_plan_config
from megaflamingo.planning import world_from_hostfile
from tests.planning.scaled import SCALED, measured_step_peak

ROOT = Path(__file__).resolve().parents[2]
CONFIG_3D = ROOT / "configs/llama3-70b-3d.yaml"
HOSTFILE = ROOT / "hostfiles/h100-8nodes"
# Meta-Llama-3-70B's public config.json (the only file of the checkpoint a plan reads).
LLAMA3_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
              "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
              "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "max_position_embeddings": 8192, "tie_word_embeddings": False, "hidden_act": "silu",
              "attention_bias": False, "torch_dtype": "bfloat16"}


def _llama_dir(root: Path) -> Path:
    path = root / "lm/Meta-Llama-3-70B"
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(LLAMA3_70B))
    return path


@pytest.fixture(scope="module")
def plan_3d(tmp_path_factory):
    lm_dir = _llama_dir(tmp_path_factory.mktemp("ckpt"))
    cfg, notes = load_plan_config(str(CONFIG_3D), [f"model.lm.hf_path={lm_dir}"])
    world, hosts = world_from_hostfile(str(HOSTFILE))
    return cfg, build_plan(cfg, world, hosts, 80 * GiB, notes)


# ----------------------------------------------------------------------------- analytic count


def _vit_l14() -> int:
    """open_clip ViT-L/14 visual tower at 224 px (width W=1024, 24 layers, output 768)."""
    W, grid = 1024, 224 // 14
    block = 2 * W + (3 * W * W + 3 * W) + (W * W + W) + 2 * W + (4 * W * W + 4 * W) + (4 * W * W + W)
    return 3 * 14 * 14 * W + W + (grid * grid + 1) * W + 2 * W + 24 * block + 2 * W + W * 768


def _perceiver(Dv: int = 1024, depth: int = 6, inner: int = 512, latents: int = 64, ff: int = 4) -> int:
    layer = 2 * 2 * Dv + Dv * inner + Dv * 2 * inner + inner * Dv + 2 * Dv + 2 * ff * Dv * Dv
    return latents * Dv + depth * layer + 2 * Dv


def analytic_rank(stage_layers: range, tp: int, tp_rank: int) -> tuple[int, int]:
    """(frozen, trainable) elements of a Llama-3-70B + ViT-L/14 Flamingo rank, from the shapes."""
    D, H, G, K, F, L, every = 8192, 64, 8, 128, 28672, 80, 4
    V, Dv, inner = 128256 + 3, 1024, 64 * 128
    rows = shard_bounds(V, tp_rank, tp)[1] - shard_bounds(V, tp_rank, tp)[0]
    decoder = (D * H * K + 2 * D * G * K + H * K * D + 3 * D * F) // tp + 2 * D
    xattn = (D * inner + Dv * 2 * inner + inner * D + 2 * 4 * D * D) // tp + 2 * D + 2 * D + 2
    frozen = trainable = 0
    if 0 in stage_layers:
        frozen += _vit_l14() + rows * D
        trainable += _perceiver() + 2 * D
    for i in range(L):
        if i + 1 in stage_layers:
            frozen += decoder
            trainable += xattn if (i + 1) % every == 0 else 0
    if L + 1 in stage_layers:
        frozen += rows * D + D
    return frozen, trainable


def test_3d_plan_counts_equal_the_analytic_count(plan_3d):
    cfg, plan = plan_3d
    assert (plan.dims.tp, plan.dims.pp, plan.dims.dp) == (8, 4, 2)
    assert plan.parts[0] == 0 and plan.parts[-1] == 82 and len(plan.parts) == 5
    for rank in plan.ranks:
        c = rank.coords
        want = analytic_rank(range(plan.parts[c["pp"]], plan.parts[c["pp"] + 1]), 8, c["tp"])
        assert (rank.params.frozen, rank.params.trainable) == want, rank.rank
    hosts = {r.host for r in plan.ranks if r.coords["pp"] == 0 and r.coords["dp"] == 0}
    assert hosts == {"h100-node-0"}  # one TP group per node


def test_3d_plan_flops_and_layout(plan_3d):
    cfg, plan = plan_3d
    want = sum(s.batch_size * count_flops(cfg.model, s.seq_len, s.max_num_media, recompute=True).true
               for s in (cfg.data.laion, cfg.data.mmc4))
    assert plan.flops_per_step == pytest.approx(want, rel=1e-12)
    layout = {s.name: (s.accumulation, s.micro_batch.batch) for s in plan.streams}
    assert layout == {"laion": (32, 16), "mmc4": (32, 4)}
    assert plan.bubble == pytest.approx(3 / 67)
    text = format_plan(plan)
    assert "bubble 3/67" in text and f"{want:.4g}" in text and "fits" in text
    assert len([ln for ln in text.splitlines() if ln.lstrip()[:1].isdigit() and "h100-node" in ln]) == 64


def test_3d_plan_memory_terms_follow_zero1_bf16(plan_3d):
    _, plan = plan_3d
    for rank in plan.ranks:
        p, m = rank.params, rank.memory
        assert m["frozen_weights"] == 2 * p.frozen and m["trainable_weights"] == 2 * p.trainable
        assert m["gradients"] == 2 * p.trainable and m["optimizer"] == 12 * p.trainable / 2
        assert m["activations"] > 0 and rank.peak == pytest.approx(sum(m.values()))
    stage0 = [r for r in plan.ranks if r.coords["pp"] == 0]
    stage3 = [r for r in plan.ranks if r.coords["pp"] == 3]
    # 1F1B: stage 0 holds pp = 4 micro-batches in flight, the last stage 1.
    assert stage0[0].memory["activations"] > stage3[0].memory["activations"]
    plan.gpu_mem = 8 * GiB
    with pytest.raises(PlanError, match="does not fit: rank 0 "):
        check_fits(plan)


# ----------------------------------------------------------------------------- measured memory


def test_openflamingo_9b_estimate_is_within_15_percent_of_a_measured_step():
    """The 9B config scaled down (tests/planning/scaled.py): the plan's peak and its
    activations + gradients against one measured training step of the real model."""
    cfg, notes = load_plan_config(str(ROOT / "configs/openflamingo-9b.yaml"), SCALED)
    rank = build_plan(cfg, 1, notes=notes).ranks[0]
    measured = measured_step_peak(cfg)
    assert measured["parameters"] == rank.memory["frozen_weights"] + rank.memory["trainable_weights"]
    assert measured["optimizer"] == rank.memory["optimizer"]
    step = rank.memory["activations"] + rank.memory["gradients"]
    print(f"estimated peak {rank.peak / 2**20:.1f} MiB, measured {measured['peak'] / 2**20:.1f} MiB; "
          f"activations + gradients {step / 2**20:.1f} vs {measured['step'] / 2**20:.1f} MiB")
    assert rank.peak == pytest.approx(measured["peak"], rel=0.15)
    assert step == pytest.approx(measured["step"], rel=0.15)
    assert rank.memory["activations"] > 0.5 * rank.peak  # the activations are what is being checked


def test_openflamingo_9b_bf16_activations_are_within_15_percent_of_a_measured_step():
    """The same in bf16 (fp32 norms and softmax statistics, the loss's fp32 copies): activations
    + gradients only, since a bare torch AdamW keeps no fp32 master copy as DeepSpeed's does."""
    cfg, notes = load_plan_config(str(ROOT / "configs/openflamingo-9b.yaml"), [*SCALED, "train.precision=bf16"])
    rank = build_plan(cfg, 1, notes=notes).ranks[0]
    measured = measured_step_peak(cfg)
    step = rank.memory["activations"] + rank.memory["gradients"]
    print(f"bf16 activations + gradients {step / 2**20:.1f} MiB estimated, {measured['step'] / 2**20:.1f} measured")
    assert measured["parameters"] == rank.memory["frozen_weights"] + rank.memory["trainable_weights"]
    assert step == pytest.approx(measured["step"], rel=0.15)


# ----------------------------------------------------------------------------- command line


def _launcher():
    spec = importlib.util.spec_from_file_location("plan_launcher", ROOT / "launcher/plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_runs_on_the_3d_example_from_its_config_json_only(tmp_path):
    _llama_dir(tmp_path)  # the config's relative lm/Meta-Llama-3-70B, config.json only
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "launcher/plan.py"), "--config", str(CONFIG_3D),
                          "--hostfile", str(HOSTFILE), "--gpu-mem", "80GiB"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "world 64 = tp 8 x pp 4 x dp 2" in out.stdout and "device memory 80.0 GiB: fits" in out.stdout


ILLEGAL = [
    (["--world", "48"], "does not divide the world size 48"),
    (["--world", "64", "parallel.zero_stage=2"], "ZeRO stage 0 or 1"),
    (["--world", "96", "parallel.tp=3"], "does not divide model.lm.num_heads=64"),
    (["--world", "64", "--gpu-mem", "80 furlongs"], "expected a size such as 80GiB"),
    (["--world", "64", "model.lm.hf_path=nowhere"], "no config.json in nowhere"),
]


@pytest.mark.parametrize("args,words", ILLEGAL, ids=[w for _, w in ILLEGAL])
def test_cli_illegal_layout_exits_2_with_one_line(tmp_path, monkeypatch, capsys, args, words):
    _llama_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert _launcher().main(["--config", str(CONFIG_3D), *args]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and err.startswith("error: ")


def test_cli_not_fitting_exits_2_with_one_line(tmp_path, capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode-a slots=2\nnode-b slots=2\n")
    code = _launcher().main(["--config", str(ROOT / "configs/tiny.yaml"), "--hostfile", str(hostfile),
                             "--gpu-mem", "1MiB", "parallel.tp=2"])
    captured = capsys.readouterr()
    assert code == 2 and "node-b" in captured.out
    assert captured.err.startswith("error: does not fit: rank") and captured.err.count("\n") == 1
    hostfile.write_text("node-a 2\n")
    assert _launcher().main(["--config", str(ROOT / "configs/tiny.yaml"), "--hostfile", str(hostfile)]) == 2
    assert "expected '<host> slots=<n>'" in capsys.readouterr().err


def test_pretrain_dry_run_plans_the_launch_world(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("pretrain_launcher", ROOT / "launcher/pretrain.py")
    pretrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert pretrain.main(["--config", str(ROOT / "configs/tiny.yaml"), "--dry-run", "parallel.pp=2"]) == 0
    assert "world 4 = tp 1 x pp 2 x dp 2" in capsys.readouterr().out
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert pretrain.main(["--config", str(ROOT / "configs/tiny.yaml"), "--dry-run", "parallel.pp=2"]) == 2
    err = capsys.readouterr().err
    assert "does not divide the world size 3" in err and err.count("\n") == 1


def test_frozen_dtype_and_zero3_terms():
    cfg, _ = load_plan_config(str(ROOT / "configs/tiny.yaml"), ["model.frozen_dtype=bf16", "parallel.zero_stage=3"])
    plan = build_plan(cfg, 2)
    for rank in plan.ranks:
        p, m = rank.params, rank.memory
        assert m["frozen_weights"] == 2 * p.frozen / 2 and m["trainable_weights"] == 4 * p.trainable / 2
        assert m["gradients"] == 4 * p.trainable / 2 and m["optimizer"] == 8 * p.trainable / 2
        assert m["zero3_gather"] == 4 * p.largest_layer > 0
    assert "frozen weights bf16, ZeRO-3" in format_plan(plan)
