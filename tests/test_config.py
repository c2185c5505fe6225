"""The config tree: YAML loading, dotted overrides, resolution (`megaflamingo.resolve`), one-line ConfigErrors."""

from __future__ import annotations

from pathlib import Path

import pytest

from megaflamingo.config import Config, ConfigError, config_from_dict, load_config, to_dict
from megaflamingo.resolve import check_layout, resolve_config

BASE = {"model": {"vision": {"open_clip_config": {"embed_dim": 8, "vision_cfg": {}}},
                  "media_token_id": 1, "eoc_token_id": 2}}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  vision: {open_clip_model: ViT-L-14}\n  lm: {num_layers: 4}\n"
                           "  media_token_id: 1\n  eoc_token_id: 2\noptim: {lr: 1.0e-3}\n")
    cfg = load_config(path, ["optim.lr=3e-4", "parallel.tp=2", "model.lm.rope_scaling={type: linear, factor: 2}",
                             "train.output_dir=out/x", "parallel.pipeline_partition=[0, 2]"])
    assert isinstance(cfg, Config)
    assert cfg.optim.lr == 3e-4 and cfg.parallel.tp == 2 and cfg.model.lm.num_layers == 4
    assert cfg.model.lm.rope_scaling == {"type": "linear", "factor": 2}
    assert cfg.train.output_dir == "out/x" and cfg.parallel.pipeline_partition == [0, 2]
    assert cfg.optim.betas == (0.9, 0.999)
    assert to_dict(cfg)["optim"]["lr"] == 3e-4


def test_int_is_accepted_for_float():
    assert config_from_dict(BASE, ["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optim.lrr=1"], "unknown key 'optim.lrr' (did you mean 'lr'?)"),
        (["modle.tokenizer=x"], "unknown key 'modle' (did you mean 'model'?)"),
        (["train.steps=many"], "train.steps: expected int, got 'many'"),
        (["parallel.tp=true"], "parallel.tp: expected int, got True"),
        (["model.tokenizer=/no/such/dir"], "model.tokenizer: path does not exist: /no/such/dir"),
        (["model.lm.num_heads=3"], "model.lm: hidden_size 64 is not divisible by num_heads 3"),
        (["parallel.tp=8"], "parallel.tp=8 does not divide model.lm.num_heads=4"),
        (["model.lm.num_kv_heads=2", "parallel.tp=4"], "parallel.tp=4 does not divide model.lm.num_kv_heads=2"),
        (["parallel.pp=2", "parallel.zero_stage=3"], "supports ZeRO stage 0 or 1 only"),
        (["parallel.pp=3"], "parallel.pp=3 is more than model.lm.num_layers=2"),
        (["model.lm.family=gpt2"], "model.lm.family: unknown LM family 'gpt2' (expected llama, mpt, gpt_neox, qwen2)"),
        (["model.kernels.xattn=cuda"], "model.kernels.xattn: expected auto, triton or reference"),
        (["optim.schedule=step"], "optim.schedule: expected constant, linear or cosine"),
        (["tp=2"], "unknown key 'tp'"),
        (["parallel.tp"], "override 'parallel.tp' must look like section.key=value"),
    ],
)
def test_user_errors_are_one_line_config_errors(overrides: list[str], message: str) -> None:
    """At load time, or (the layout) when the config is resolved for a world of 24 ranks."""
    with pytest.raises(ConfigError) as err:
        resolve_config(config_from_dict(BASE, overrides), world_size=24)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="set exactly one of open_clip_model or open_clip_config"):
        config_from_dict({"model": {"media_token_id": 1, "eoc_token_id": 2}})
    with pytest.raises(ConfigError, match="model.media_token_id must be set"):
        config_from_dict({"model": {"vision": {"open_clip_model": "ViT-L-14"}}})


CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"


def test_tiny_config_loads():
    cfg = load_config(CONFIGS / "tiny.yaml")
    assert cfg.model.lm.num_layers == 4 and cfg.model.cross_attn_every_n_layers == 2


@pytest.mark.parametrize("name,every_n", [("openflamingo-3b", 1), ("openflamingo-4b", 2), ("openflamingo-9b", 4)])
def test_released_recipes_load_once_their_weights_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str,
                                                        every_n: int) -> None:
    import yaml

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="path does not exist"):
        load_config(CONFIGS / f"{name}.yaml")
    raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"]
    (tmp_path / raw["vision"]["weights"]).parent.mkdir(parents=True)
    (tmp_path / raw["vision"]["weights"]).touch()
    (tmp_path / raw["lm"]["hf_path"]).mkdir(parents=True)
    (tmp_path / raw["tokenizer"]).mkdir(parents=True)
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.model.cross_attn_every_n_layers == every_n
    assert cfg.model.vision.open_clip_model == "ViT-L-14-quickgelu"
    assert cfg.data.laion.loss_multiplier == 0.2 and cfg.data.mmc4_options.sim_threshold == 0.24


def test_partial_section_keeps_the_stream_defaults():
    cfg = config_from_dict(BASE, ["data.mmc4.batch_size=4", "data.laion.shards=x.tar"])
    assert cfg.data.mmc4.batch_size == 4
    assert (cfg.data.mmc4.seq_len, cfg.data.mmc4.max_num_media) == (256, 6)
    assert cfg.data.laion.loss_multiplier == 0.2 and cfg.data.laion.shards == "x.tar"


# ----------------------------------------------------------------------------- resolution


def test_layout_rules_live_in_check_layout_only():
    cfg = config_from_dict(BASE, ["parallel.tp=8"])  # loads: the world size is not known yet
    with pytest.raises(ConfigError, match="parallel.tp=8 does not divide model.lm.num_heads=4"):
        check_layout(cfg, 8)
    cfg = config_from_dict(BASE, ["data.laion.shards=x.tar", "data.laion.batch_size=6"])
    with pytest.raises(ConfigError, match="data.laion: global batch 6 is not divisible by dp=4"):
        check_layout(cfg, 4)
    assert check_layout(cfg, 3).dp == 3


@pytest.mark.parametrize(
    "model,message",
    [
        ({"lm": {"hf_path": "."}}, "model.media_token_id must be set when model.tokenizer is not given"),
        ({"vision": {"open_clip_config": {"vision_cfg": {}}}}, "open_clip_config: missing 'embed_dim' (int)"),
        ({"vision": {"open_clip_config": {"embed_dim": 8}}}, "open_clip_config: missing 'vision_cfg' (dict)"),
    ],
)
def test_missing_fields_are_config_errors_at_load(model: dict, message: str) -> None:
    raw = {"model": {**BASE["model"], **model}}
    if "lm" in model:
        del raw["model"]["media_token_id"]
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_resolution_fills_sizes_and_ids_from_files(tmp_path: Path) -> None:
    from tests.assets import make_bpe_tokenizer
    from tests.hf_models import save_tiny_hf_lm

    lm_dir = save_tiny_hf_lm("llama_gqa", tmp_path / "lm")
    tok = make_bpe_tokenizer(tmp_path / "tok", vocab_size=257)
    raw = {"model": {"vision": BASE["model"]["vision"], "lm": {"hf_path": str(lm_dir)}, "tokenizer": str(tok)}}
    cfg, dims = resolve_config(config_from_dict(raw), world_size=2)
    import json

    hf = json.loads((lm_dir / "config.json").read_text())
    assert cfg.model.lm.hidden_size == hf["hidden_size"] and cfg.model.lm.num_layers == hf["num_hidden_layers"]
    assert cfg.model.lm.hf_path == str(lm_dir) and dims.dp == 2
    assert cfg.model.vocab_size > cfg.model.media_token_id and cfg.model.eoc_token_id is not None
    with pytest.raises(ConfigError, match=r"model.media_token_id=3 but the tokenizer at .* gives"):
        resolve_config(config_from_dict(raw, ["model.media_token_id=3"]))
    with pytest.raises(ConfigError, match="model.lm.hf_path: no config.json"):
        resolve_config(config_from_dict(raw, [f"model.lm.hf_path={tmp_path}"]))


def test_build_model_needs_a_resolved_config_and_reads_no_tokenizer(tmp_path: Path) -> None:
    from megaflamingo.builder import build_model as build_resolving
    from megaflamingo.models.flamingo import build_model
    from tests.assets import make_bpe_tokenizer

    tok = make_bpe_tokenizer(tmp_path / "tok", vocab_size=257)
    raw = {"model": {"vision": {"open_clip_config": {"embed_dim": 8, "vision_cfg": {
        "image_size": 16, "patch_size": 8, "width": 16, "layers": 1, "head_width": 8}}},
        "perceiver": {"depth": 1, "num_latents": 2}, "tokenizer": str(tok)}}
    cfg = config_from_dict(raw)
    with pytest.raises(ConfigError, match="model.vocab_size is not set: resolve the config first"):
        build_model(cfg.model)
    model = build_resolving(cfg.model)  # resolves, then builds
    assert model.lm.embed_tokens.num_embeddings == resolve_config(cfg)[0].model.vocab_size
    with pytest.raises(ConfigError, match="model.eoc_token_id=9999 is outside the vocabulary"):
        resolve_config(config_from_dict({"model": {**BASE["model"], "eoc_token_id": 9999}}))
