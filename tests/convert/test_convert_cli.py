"""launcher/convert.py in-process: to-hf / to-openflamingo / from-openflamingo / --lm-and-adapter,
one-line errors with exit code 2 for bad inputs, and the previous output surviving every failure.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path

import pytest
import torch
import yaml

from megaflamingo.config import load_config
from megaflamingo.convert.openflamingo import CheckpointError, export_openflamingo_state_dict, from_openflamingo
from tests.assets import TINY_VISION, make_bpe_tokenizer
from tests.hf_models import save_tiny_hf_lm

ROOT = Path(__file__).resolve().parents[2]
EVERY_N = 2


def _launcher():
    spec = importlib.util.spec_from_file_location("convert_launcher", ROOT / "launcher" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tokenizer, a 4-layer LLaMA dir, a vision weights file and a YAML config using them."""
    base = tmp_path_factory.mktemp("convert_cli")
    tok = make_bpe_tokenizer(base / "tok")
    lm = save_tiny_hf_lm("llama_gqa", base / "lm", num_hidden_layers=4)
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    torch.manual_seed(7)
    tower = _build_vision_tower(TINY_VISION["embed_dim"], CLIPVisionCfg(**TINY_VISION["vision_cfg"]))
    torch.save(tower.state_dict(), base / "vision.pt")
    vision = {"open_clip_config": TINY_VISION, "weights": str(base / "vision.pt")}
    (base / "vision.yaml").write_text(yaml.safe_dump(vision))
    model = {"vision": vision, "lm": {"hf_path": str(lm)}, "tokenizer": str(tok),
             "cross_attn_every_n_layers": EVERY_N, "kernels": {"xattn": "reference"},
             "perceiver": {"depth": 1, "heads": 2, "dim_head": 64, "num_latents": 4, "ff_mult": 2},
             "xattn": {"heads": 2, "dim_head": 64, "ff_mult": 2}}
    (base / "model.yaml").write_text(yaml.safe_dump({"model": model}))
    return base


def _foreign_run(assets) -> Path:
    """A run directory whose checkpoint records another model config (n = 1)."""
    from megaflamingo.config import to_dict

    step = assets / "foreign-run" / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    torch.save({"module": {}}, step / "mp_rank_00_model_states.pt")
    other = to_dict(load_config(assets / "model.yaml", ["model.cross_attn_every_n_layers=1"]).model)
    torch.save({"model_config": other}, step / "extra_rank0.pt")
    (step.parent / "latest").write_text(step.name)
    return assets / "foreign-run"


def _run(capsys, *argv) -> tuple[int, list[str]]:
    code = _launcher()([str(a) for a in argv])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return code, errors


def _fingerprint(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


def _trained_model(assets):
    """The config's model with every trainable tensor moved off its init (a 'trained' model)."""
    from megaflamingo.builder import build_model

    model = build_model(load_config(assets / "model.yaml").model).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


@pytest.fixture(scope="module")
def of_checkpoint(assets):
    model = _trained_model(assets)
    path = assets / "checkpoint.pt"
    torch.save(export_openflamingo_state_dict(model), path)
    return path, model


def test_to_hf_then_every_bad_input_exits_2_and_keeps_the_previous_output(assets, of_checkpoint, capsys):
    out = assets / "out-hf"
    code, errors = _run(capsys, "to-hf", "--config", assets / "model.yaml", "--out", out)
    assert code == 0 and not errors
    before = _fingerprint(out)
    assert "model.safetensors" in before and "config.json" in before

    # a sharded LM checkpoint with one shard deleted
    sharded = assets / "lm-sharded"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(assets / "lm").save_pretrained(sharded, max_shard_size="20KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    # an OpenFlamingo checkpoint cut in half, one for an MPT LM, and the right one under the wrong n
    ckpt, _ = of_checkpoint
    truncated = assets / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    mpt_keys = assets / "mpt.pt"
    torch.save({k.replace("lang_encoder.model.layers.", "lang_encoder.transformer.blocks."): v
                for k, v in torch.load(ckpt, weights_only=True).items()}, mpt_keys)
    cut = assets / "lm-truncated"
    cut.mkdir(exist_ok=True)
    for file in (assets / "lm").iterdir():
        (cut / file.name).write_bytes(file.read_bytes())
    weights = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    vision_cut = assets / "vision-truncated.pt"
    vision_cut.write_bytes((assets / "vision.pt").read_bytes()[:1000])
    cases = {
        "truncated vision weights": ([f"model.vision.weights={vision_cut}"], "vision-truncated.pt"),
        "missing shard": ([f"model.lm.hf_path={sharded}"], shards[1].name),
        "truncated LM weights": ([f"model.lm.hf_path={cut}"], "lm-truncated/model.safetensors"),
        "truncated checkpoint": ([f"model.openflamingo_checkpoint={truncated}"], "truncated.pt"),
        "wrong family": ([f"model.openflamingo_checkpoint={mpt_keys}"], "is for a mpt LM"),
        "wrong n": ([f"model.openflamingo_checkpoint={ckpt}", "model.cross_attn_every_n_layers=1"],
                    f"cross_attn_every_n_layers={EVERY_N}"),
        "missing checkpoint dir": (["--checkpoint", assets / "no-such-run"], "no-such-run"),
        "checkpoint of another model": (["--checkpoint", _foreign_run(assets)], "model.cross_attn_every_n_layers"),
    }
    for what, (extra, named) in cases.items():
        code, errors = _run(capsys, "to-hf", "--config", assets / "model.yaml", "--out", out, *extra)
        assert code == 2, what
        assert len(errors) == 1 and named in errors[0], (what, errors)
        assert _fingerprint(out) == before, what  # the previous output is untouched
    assert not [p for p in assets.iterdir() if p.name.startswith(".out-hf.")]  # no temporary left over


def test_openflamingo_round_trip_infers_n_and_gives_the_same_logits(assets, of_checkpoint, capsys):
    ckpt, model = of_checkpoint
    out = assets / "of.pt"
    code, _ = _run(capsys, "to-openflamingo", "--config", assets / "model.yaml",
                   f"model.openflamingo_checkpoint={ckpt}", "--out", out)
    assert code == 0
    first, again = torch.load(ckpt, weights_only=True), torch.load(out, weights_only=True)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)

    import megaflamingo

    loaded = megaflamingo.from_openflamingo(out, lm=assets / "lm", vision=assets / "vision.yaml",
                                            tokenizer=assets / "tok")
    report = loaded.openflamingo_report
    assert report.cross_attn_every_n_layers == EVERY_N
    assert report.model_config.perceiver.num_latents == 4 and report.model_config.xattn.heads == 2
    assert any(n.startswith("vision.") for n in report.from_sources)
    assert any(n.startswith("lm.layers.") for n in report.from_sources)
    assert not any(n.startswith(("perceiver.", "xattn.")) for n in report.from_sources)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 2, 1, 3, 32, 32, generator=gen)
    ids = torch.randint(0, 290, (2, 12), generator=gen)
    ids[:, [1, 6]] = report.model_config.media_token_id
    with torch.no_grad():
        assert torch.equal(loaded(images, ids), model(images, ids))

    code, errors = _run(capsys, "from-openflamingo", "--checkpoint", out, "--lm", assets / "lm",
                        "--vision", assets / "vision.yaml", "--tokenizer", assets / "tok", "--out", assets / "of-hf")
    assert code == 0 and not errors
    assert (assets / "of-hf" / "modeling_megaflamingo.py").is_file()


def test_from_openflamingo_errors_name_the_problem(assets, of_checkpoint):
    ckpt, _ = of_checkpoint
    shallow = save_tiny_hf_lm("llama_gqa", assets / "lm-3", num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"before decoder layers \[1, 3\] \(cross_attn_every_n_layers=2\), "
                                              r"which does not fit a 3-layer LM"):
        from_openflamingo(ckpt, lm=shallow, vision=assets / "vision.yaml", tokenizer=assets / "tok")
    mpt = save_tiny_hf_lm("mpt", assets / "lm-mpt", n_layers=4)
    with pytest.raises(CheckpointError, match="checkpoint is for a llama/qwen2 LM .* is mpt"):
        from_openflamingo(ckpt, lm=mpt, vision=assets / "vision.yaml", tokenizer=assets / "tok")


def test_lm_and_adapter(assets, of_checkpoint, capsys):
    """The LM dir loads in transformers with the resized vocabulary and gives our LM's logits; the
    adapter holds the trainable modules under OpenFlamingo's names."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt, model = of_checkpoint
    out = assets / "lm-adapter"
    code, _ = _run(capsys, "to-hf", "--config", assets / "model.yaml", f"model.openflamingo_checkpoint={ckpt}",
                   "--out", out, "--lm-and-adapter")
    assert code == 0
    lm = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert lm.get_input_embeddings().weight.shape[0] == len(tokenizer) == model.lm.vocab_size
    ids = tokenizer(["<image>a blue circle<|endofchunk|>"], return_tensors="pt").input_ids
    with torch.no_grad():
        want = model.lm(ids)
        got = lm(ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
    adapter = load_file(out / "adapter.safetensors")
    reference = export_openflamingo_state_dict(model)
    assert adapter.keys() == reference.keys()
    assert all(torch.equal(adapter[k], reference[k]) for k in adapter)
    assert any(re.match(r"lang_encoder\.model\.layers\.\d+\.gated_cross_attn_layer\.attn\.to_q", k) for k in adapter)
