"""Answer-only labels, the easy-vqa eval/probe split, the tiny-assets command, the demo plots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from megaflamingo.data.batching import TextEncoder
from megaflamingo.data.easyvqa import ANSWER_MARK, answer_only_labels, question_type, write_vqa
from megaflamingo.data.laion import laion_labels, laion_text
from megaflamingo.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    """`prepare_data.py tiny` as a user runs it; returns (out dir, its JSON summary)."""
    out = tmp_path_factory.mktemp("tiny") / "assets"
    proc = subprocess.run([sys.executable, "launcher/prepare_data.py", "tiny", "--out", str(out), "--limit", "40"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, json.loads(proc.stdout)


def test_tiny_command_writes_what_tiny_yaml_needs(tiny_assets):
    out, summary = tiny_assets
    from megaflamingo.config import load_config

    cfg = load_config(ROOT / "configs/tiny.yaml", summary["overrides"])  # validates every path
    _, ids = load_tokenizer(cfg.model.tokenizer)
    assert (ids.vocab_size, ids.eoc_token_id, ids.media_token_id, ids.pad_token_id) == \
        (cfg.model.lm.vocab_size, cfg.model.eoc_token_id, cfg.model.media_token_id, cfg.model.pad_token_id)
    assert sorted(p.name for p in (out / "data" / "laion").glob("*.tar")) and list((out / "data" / "mmc4").glob("*.tar"))
    header = (ROOT / "configs/tiny.yaml").read_text().split("model:")[0]
    assert "launcher/prepare_data.py tiny --out runs/tiny-assets" in header


def test_tiny_yaml_trains_with_the_printed_overrides(tiny_assets, tmp_path):
    """One step of configs/tiny.yaml in a plain process, as the header says (no tokenizer by hand)."""
    _, summary = tiny_assets
    cmd = [sys.executable, "launcher/pretrain.py", "--config", "configs/tiny.yaml", *summary["overrides"],
           "train.steps=1", f"train.output_dir={tmp_path / 'run'}", "logging.tensorboard=false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["step"] == 1 and record["loss"] > 0


def test_answer_only_labels_keep_the_answer_and_what_follows(tiny_assets):
    out, _ = tiny_assets
    tokenizer, ids = load_tokenizer(out / "tokenizer")
    encode = TextEncoder(tokenizer, 96)
    text = laion_text("Question:What color is the shape? Short answer:blue", tokenizer.eos_token)
    input_ids, _ = encode(text)
    labels = laion_labels(input_ids, ids)
    answer = answer_only_labels(labels, text, encode)
    kept = answer != -100
    assert tokenizer.decode(input_ids[kept]) == f"blue<|endofchunk|>{tokenizer.eos_token}"
    assert torch.equal(answer[kept], labels[kept])
    caption = laion_text("a blue circle", tokenizer.eos_token)
    caption_labels = laion_labels(encode(caption)[0], ids)
    assert torch.equal(answer_only_labels(caption_labels, caption, encode), caption_labels)  # not VQA: unchanged
    assert ANSWER_MARK == "Short answer:"


def test_eval_and_probe_questions_come_from_different_images(tmp_path):
    count, probe = write_vqa(tmp_path, limit=20, seed=0)
    test_rows = [json.loads(l) for l in (tmp_path / "test.jsonl").read_text().splitlines()]
    probe_rows = [json.loads(l) for l in (tmp_path / "probe.jsonl").read_text().splitlines()]
    assert (len(test_rows), len(probe_rows)) == (count, probe) and probe > 0
    assert not {r["image"] for r in test_rows} & {r["image"] for r in probe_rows}
    assert len({r["image"] for r in test_rows[:20]}) > 5  # shuffled: the first lines span many images
    assert [r["question_id"] for r in test_rows] == list(range(count))
    assert {r["question_type"] for r in test_rows} == {"color", "shape", "yes/no"}
    assert all(question_type(r["answers"][0]) == r["question_type"] for r in test_rows)


def _metrics(path: Path) -> None:
    rows = [{"step": s, "loss": 2.0 / s, "loss_laion": 2.0 / s, "gates/attn_2": 0.46 + 0.01 * s,
             "gates/ff_2": 0.46 - 0.01 * s, "gates/attn_5": 0.4, "gates/ff_5": 0.5} for s in range(1, 11)]
    rows[4].update({"probe/answer_loss_real": 0.9, "probe/answer_loss_blank": 1.1})
    rows[9].update({"probe/answer_loss_real": 0.5, "probe/answer_loss_blank": 1.0})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plots_are_written_as_pngs(tmp_path):
    from megaflamingo.eval.plots import plot_run

    _metrics(tmp_path / "metrics.jsonl")
    arm = lambda acc: {"accuracy": acc, "count": 200, "by_type": {  # noqa: E731
        "color": {"accuracy": acc - 10, "count": 60}, "shape": {"accuracy": acc, "count": 40},
        "yes/no": {"accuracy": acc + 5, "count": 100}}}
    (tmp_path / "eval.json").write_text(json.dumps({"trained": arm(85.0), "baseline": arm(65.0)}))
    pngs = plot_run(tmp_path / "metrics.jsonl", tmp_path / "eval.json", tmp_path / "plots")
    assert set(pngs) == {"loss", "gates", "answer_loss", "accuracy"}
    for png in pngs.values():
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size[0] >= 600
    # A run without gate or probe metrics and no eval: only the loss plot, nothing drawn empty.
    (tmp_path / "bare.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2)))
    assert set(plot_run(tmp_path / "bare.jsonl", None, tmp_path / "bare")) == {"loss"}
    (tmp_path / "empty.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    with pytest.raises(ValueError, match="no 'loss'"):
        plot_run(tmp_path / "empty.jsonl", None, tmp_path / "none")


def test_answer_only_stream_option_reaches_the_batches(tiny_assets):
    """data.laion.answer_only_loss=true: every labelled span of a training batch is answer + EOC (+ EOS)."""
    from megaflamingo.config import load_config
    from megaflamingo.data.loader import build_train_loader

    out, summary = tiny_assets
    tokenizer, _ = load_tokenizer(out / "tokenizer")
    base = [f"model.tokenizer={out / 'tokenizer'}", f"data.laion.shards={out / 'data' / 'laion_vqa' / '*.tar'}",
            "data.laion.seq_len=96", "data.laion.batch_size=4", "data.laion.shuffle_buffer=0", "data.mmc4.shards=null"]
    on = next(iter(build_train_loader(load_config(ROOT / "configs/tiny.yaml", [*base, "data.laion.answer_only_loss=true"]),
                                      tokenizer, 0, 1)))[0]
    off = next(iter(build_train_loader(load_config(ROOT / "configs/tiny.yaml", base), tokenizer, 0, 1)))[0]
    assert torch.equal(on["input_ids"], off["input_ids"])
    for ids, labels, full in zip(on["input_ids"], on["labels"], off["labels"]):
        text = tokenizer.decode(ids[labels != -100])
        answer = tokenizer.decode(ids).split(ANSWER_MARK)[1].split("<|endofchunk|>")[0]
        assert text == f"{answer}<|endofchunk|>{tokenizer.eos_token}", text
        assert (full != -100).sum() > (labels != -100).sum()  # the default keeps the question too


def test_lr_multipliers_split_the_groups():
    from megaflamingo.training.lr_groups import with_lr_multipliers

    module = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2)})
    module.a.attn_gate = torch.nn.Parameter(torch.zeros(1))
    groups = [{"params": [module.a.weight, module.a.attn_gate], "weight_decay": 0.1},
              {"params": [module.b.weight], "weight_decay": 0.0}]
    assert with_lr_multipliers(groups, module, 1e-3, {}) is groups
    out = with_lr_multipliers(groups, module, 1e-3, {"_gate": 10.0, "b.": 0.5})
    got = sorted((g.get("lr", 1e-3), [id(p) for p in g["params"]], g["weight_decay"]) for g in out)
    assert [lr for lr, _, _ in got] == pytest.approx([5e-4, 1e-3, 1e-2])
    assert [(ids, wd) for _, ids, wd in got] == [([id(module.b.weight)], 0.0), ([id(module.a.weight)], 0.1),
                                                 ([id(module.a.attn_gate)], 0.1)]
    assert "lr" not in next(g for g in out if g["params"] == [module.a.weight])  # factor 1: the base lr
