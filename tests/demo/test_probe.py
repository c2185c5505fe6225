"""Training diagnostics: tanh of every gate, and the held-out answer loss with real vs blank images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from megaflamingo.training.probe import AnswerLossProbe, gate_metrics

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tiny Flamingo from configs/tiny.yaml, its tokenizer, a 4-question VQA jsonl, the transform)."""
    from launcher.prepare_data import byte_level_tokenizer
    from megaflamingo import build_model
    from megaflamingo.config import load_config
    from megaflamingo.data.images import ImageTransform
    from megaflamingo.data.tokenizer import load_tokenizer

    base = tmp_path_factory.mktemp("probe")
    tok_dir = byte_level_tokenizer(base / "tok")
    torch.manual_seed(0)
    model = build_model(load_config(ROOT / "configs/tiny.yaml", [f"model.tokenizer={tok_dir}"]).model).eval()
    rows = []
    for n, (color, answer) in enumerate([((200, 0, 0), "red"), ((0, 0, 200), "blue"), ((0, 150, 0), "yes"),
                                         ((90, 90, 90), "no")]):
        Image.new("RGB", (40, 40), color).save(base / f"{n}.png")
        rows.append({"question_id": n, "image": f"{n}.png", "question": "What color is the shape?",
                     "answers": [answer] * 10})
    (base / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, load_tokenizer(tok_dir)[0], base / "q.jsonl", ImageTransform(32)


def test_gate_metrics_name_every_block_and_take_tanh(tiny):
    model = tiny[0]
    with torch.no_grad():
        for i, block in model.xattn.items():
            block.attn_gate.fill_(0.1 * (int(i) + 1))
            block.ff_gate.fill_(-0.2)
    gates = gate_metrics(model)
    assert set(gates) == {f"gates/{kind}_{i}" for i in model.xattn for kind in ("attn", "ff")}
    for i in model.xattn:
        assert gates[f"gates/attn_{i}"] == pytest.approx(math.tanh(0.1 * (int(i) + 1)))
        assert gates[f"gates/ff_{i}"] == pytest.approx(math.tanh(-0.2))


def test_answer_loss_real_equals_blank_while_the_gates_are_closed(tiny):
    model, tokenizer, path, transform = tiny
    probe = AnswerLossProbe(path, limit=3, tokenizer=tokenizer, transform=transform)
    assert probe.input_ids.shape[0] == 3
    kept = probe.labels[0][probe.labels[0] != -100]
    assert tokenizer.decode(kept) == "red<|endofchunk|>"  # the answer and <|endofchunk|> only
    with torch.no_grad():
        for block in model.xattn.values():
            block.attn_gate.zero_()
            block.ff_gate.zero_()
    closed = probe(model)
    assert closed["probe/answer_loss_real"] == closed["probe/answer_loss_blank"] > 0
    with torch.no_grad():
        for block in model.xattn.values():
            block.attn_gate.fill_(2.0)
    model.train()
    opened = probe(model)
    assert model.training  # the mode is restored
    assert opened["probe/answer_loss_gap"] == pytest.approx(
        opened["probe/answer_loss_blank"] - opened["probe/answer_loss_real"])
    assert opened["probe/answer_loss_real"] != opened["probe/answer_loss_blank"]  # the images now matter
    with pytest.raises(ValueError, match="no questions"):
        empty = path.with_name("empty.jsonl")
        empty.write_text("")
        AnswerLossProbe(empty, 4, tokenizer, transform)
