"""The Hugging Face export: reloaded in a fresh process with transformers alone (megaflamingo,
open_clip and open_flamingo unimportable, HF_HUB_OFFLINE=1), it gives megaflamingo's logits and
greedy tokens, and its processor gives the data pipeline's tensors.

One fixture exports every model (LLaMA GQA untied, LLaMA tied, MPT, GPT-NeoX, Qwen2; a bf16 copy
of one, and one sharded into many small files) and one subprocess loads them all: the checks below
read its results.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from megaflamingo.config import Config, KernelsConfig, LMConfig, ModelConfig, PerceiverConfig, VisionConfig, XAttnConfig
from megaflamingo.convert.hf import write_hf_dir
from megaflamingo.data.tokenizer import load_tokenizer
from tests.assets import TINY_VISION, make_bpe_tokenizer
from tests.hf_models import save_tiny_hf_lm

VARIANTS = {"llama_gqa": 1, "llama_tied": 2, "mpt": 1, "gpt_neox_parallel": 2, "qwen2_tied": 3}  # variant -> n
CHECK_SCRIPT = Path(__file__).with_name("hf_load_check.py")
MAX_NEW = 6
DOCS = [
    "text before the image <image>a blue circle<|endofchunk|><image>a red",
    "<image>Question: what color? Short answer:",
    "<image>one<|endofchunk|><image>two<|endofchunk|><image>three images, two given",
]


def _model_config(tok: Path, lm: Path, every_n: int) -> ModelConfig:
    from megaflamingo.resolve import resolve_model

    return resolve_model(ModelConfig(
        vision=VisionConfig(open_clip_config=TINY_VISION), lm=LMConfig(hf_path=str(lm)), tokenizer=str(tok),
        cross_attn_every_n_layers=every_n, perceiver=PerceiverConfig(depth=2, heads=2, dim_head=16, num_latents=8,
                                                                     ff_mult=2),
        xattn=XAttnConfig(heads=2, dim_head=16, ff_mult=2), kernels=KernelsConfig(xattn="reference")))


def _build(cfg: ModelConfig, seed: int):
    from megaflamingo.models.flamingo import build_model

    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # open gates (both signs) and move the added rows off their init
        for block in model.xattn.values():
            block.attn_gate.uniform_(-1.0, 1.0, generator=gen)
            block.ff_gate.uniform_(-1.0, 1.0, generator=gen)
        model.lm.embed_tokens.added.normal_(0, 0.5, generator=gen)
    return model


def _batches(tokenizer, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(len(DOCS), 2, 1, 3, 32, 32, generator=gen)
    images[1, 1:] = 0  # one image: zero-padded as the pipelines do
    out = {}
    for side in ("left", "right"):
        tokenizer.padding_side = side
        enc = tokenizer(DOCS, return_tensors="pt", padding="longest")
        out[side] = (images, enc.input_ids, enc.attention_mask)
    return out


def _pil_images(seed: int) -> list[Image.Image]:
    gen = torch.Generator().manual_seed(seed)
    sizes = [(50, 40), (37, 64), (32, 32)]  # landscape, portrait, already the tower's size
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy())
            for w, h in sizes]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export every variant; run the fresh-process check once; return (ours, theirs, dirs)."""
    from megaflamingo.eval.generation import UncachedDecoder, greedy_search

    base = tmp_path_factory.mktemp("hf_export")
    tok_dir = make_bpe_tokenizer(base / "tok")
    tokenizer, ids = load_tokenizer(tok_dir)
    jobs, ours, dirs = {}, {}, {}
    for seed, (variant, every_n) in enumerate(VARIANTS.items()):
        cfg = _model_config(tok_dir, save_tiny_hf_lm(variant, base / f"lm-{variant}", seed=seed), every_n)
        model = _build(cfg, seed)
        batches = _batches(tokenizer, seed)
        with torch.no_grad():
            logits = {side: model(*batch) for side, batch in batches.items()}
        greedy = greedy_search(UncachedDecoder(model), *batches["left"], MAX_NEW, ids.eoc_token_id)
        dtypes = ("fp32", "bf16") if variant == "llama_gqa" else ("fp32",)
        for dtype in dtypes:
            name = f"{variant}-{dtype}"
            dirs[name] = base / name
            dirs[name].mkdir()
            write_hf_dir(model, Config(model=cfg), tokenizer, dirs[name], dtype)
            jobs[name] = {"dir": str(dirs[name]), "batches": batches, "max_new_tokens": MAX_NEW if dtype == "fp32" else 0}
        ours[variant] = {"logits": logits, "greedy": greedy, "ids": ids}
        if variant == "llama_tied":  # tied head + an index over many shards (the > 5 GB path, scaled down)
            monkeypatch = pytest.MonkeyPatch()
            monkeypatch.setattr("megaflamingo.convert.hf.MAX_SHARD_SIZE", "40KB")
            dirs["sharded"] = base / "sharded"
            dirs["sharded"].mkdir()
            write_hf_dir(model, Config(model=cfg), tokenizer, dirs["sharded"])
            monkeypatch.undo()
            jobs["sharded"] = {"dir": str(dirs["sharded"]), "batches": batches, "max_new_tokens": 0}
    jobs["llama_gqa-fp32"]["processor"] = {"images": [[_pil_images(0)[0]], _pil_images(0)[1:]],
                                           "texts": ["<image>a blue circle<|endofchunk|>",
                                                     "<image>one<|endofchunk|><image>two words"],
                                           "max_length": 24}
    torch.save(jobs, base / "jobs.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(CHECK_SCRIPT), str(base / "jobs.pt"), str(base / "results.pt")],
                          cwd=base, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return ours, torch.load(base / "results.pt", weights_only=False), dirs, tokenizer


def _rel_err(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask.bool()
    return ((got[keep] - want[keep]).abs().max() / want[keep].abs().max()).item()


def test_loading_needed_no_megaflamingo_open_clip_or_open_flamingo(exported):
    _, theirs, _, _ = exported
    assert theirs["_blocked"] == []  # nothing replaced the blocked (None) entries


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_megaflamingo(exported, variant):
    ours, theirs, _, _ = exported
    for side in ("left", "right"):
        mask = _mask(exported, variant, side)
        got, want = theirs[f"{variant}-fp32"]["logits"][side], ours[variant]["logits"][side]
        assert got.shape == want.shape
        assert _rel_err(got, want, mask) <= 1e-5, (variant, side)


def _mask(exported, variant: str, side: str) -> torch.Tensor:
    tokenizer = exported[3]
    tokenizer.padding_side = side
    return tokenizer(DOCS, return_tensors="pt", padding="longest").attention_mask


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_generate_equals_megaflamingo_greedy(exported, variant):
    ours, theirs, _, _ = exported
    eoc = ours[variant]["ids"].eoc_token_id
    generated = theirs[f"{variant}-fp32"]["generated"]
    calls = theirs[f"{variant}-fp32"]["generate_calls"]
    assert calls["vision"] == 1  # the images are encoded once
    prompt = exported[1][f"{variant}-fp32"]["logits"]["left"].shape[1]
    assert calls["lm_lengths"][0] == prompt and set(calls["lm_lengths"][1:]) == {1}  # KV cache
    for row, want in enumerate(ours[variant]["greedy"]):
        got = generated[row].tolist()
        if eoc in got:
            got = got[:got.index(eoc) + 1]
        assert got == want, (variant, row)


def test_bf16_export_loads_and_runs(exported):
    ours, theirs, dirs, _ = exported
    result = theirs["llama_gqa-bf16"]
    assert result["dtype"] == "torch.bfloat16"
    config = json.loads((dirs["llama_gqa-bf16"] / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    mask = _mask(exported, "llama_gqa", "right")
    got, want = result["logits"]["right"], ours["llama_gqa"]["logits"]["right"]
    assert torch.isfinite(got).all()
    assert _rel_err(got, want, mask) < 0.1  # bf16 rounding, same model


def test_directory_contents_and_tokens(exported):
    ours, theirs, dirs, tokenizer = exported
    out = dirs["mpt-fp32"]
    for name in ("config.json", "configuration_megaflamingo.py", "modeling_megaflamingo.py",
                 "processing_megaflamingo.py", "model.safetensors", "generation_config.json",
                 "preprocessor_config.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"].startswith("modeling_megaflamingo.")
    for source in out.glob("*_megaflamingo.py"):
        imports = [line.replace(".configuration_megaflamingo", "") for line in source.read_text().splitlines()
                   if line.startswith(("import ", "from "))]
        assert not [line for line in imports if re.search(r"\b(megaflamingo|open_clip|open_flamingo)\b", line)]
    generation = json.loads((out / "generation_config.json").read_text())
    ids = ours["mpt"]["ids"]
    assert generation["eos_token_id"] == ids.eoc_token_id and not generation.get("do_sample", False)
    assert generation.get("num_beams", 1) == 1
    assert theirs["mpt-fp32"]["tokens"] == ["<image>", "<|endofchunk|>"]
    assert theirs["mpt-fp32"]["vocab"] == ids.vocab_size


def test_processor_equals_data_pipeline(exported):
    """input_ids / attention_mask as the pipeline's TextEncoder, vision_x as its collate (no flip)."""
    from megaflamingo.data.batching import Sample, TextEncoder, collate
    from megaflamingo.data.images import ImageTransform

    _, theirs, _, tokenizer = exported
    got = theirs["llama_gqa-fp32"]["processor"]
    encoder = TextEncoder(tokenizer, seq_len=24)
    images = [[_pil_images(0)[0]], _pil_images(0)[1:]]
    texts = ["<image>a blue circle<|endofchunk|>", "<image>one<|endofchunk|><image>two words"]
    samples = []
    for sample_images, text in zip(images, texts):
        ids, mask = encoder(text)
        samples.append(Sample(images=sample_images, flip=False, input_ids=ids, attention_mask=mask, labels=ids))
    batch = collate(samples, ImageTransform(TINY_VISION["vision_cfg"]["image_size"]), max_num_media=2, loss_weight=1.0)
    assert torch.equal(got["input_ids"], batch["input_ids"])
    assert torch.equal(got["attention_mask"], batch["attention_mask"])
    assert torch.equal(got["vision_x"], batch["images"])  # bit for bit


def test_sharded_export_loads_with_its_index(exported):
    ours, theirs, dirs, _ = exported
    index = json.loads((dirs["sharded"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    mask = _mask(exported, "llama_tied", "left")
    assert _rel_err(theirs["sharded"]["logits"]["left"], ours["llama_tied"]["logits"]["left"], mask) <= 1e-5
