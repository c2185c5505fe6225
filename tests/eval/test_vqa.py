"""VQA evaluation: the answer rules, greedy decoding, and the batched evaluation loop."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from megaflamingo.eval.vqa import (evaluate_vqa, greedy_generate, postprocess_answer, read_vqa_jsonl,
                                   vqa_accuracy)
from tests.assets import make_bpe_tokenizer
from tests.models.test_flamingo import EOC, MEDIA, tiny_config


def test_vqa_accuracy_is_the_leave_one_out_human_agreement():
    assert vqa_accuracy("red", ["red"] * 10) == 1.0
    assert vqa_accuracy("The Red.", ["red"] * 10) == 1.0  # articles, case and punctuation do not count
    # 2 of 10 humans said blue: 2 subsets keep one blue (1/3), 8 keep both (2/3) -> 0.6
    assert vqa_accuracy("blue", ["blue"] * 2 + ["green"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("circle", ["red"] * 10) == 0.0


def test_postprocess_keeps_the_answer_part():
    assert postprocess_answer(" yes, it is") == "yes"
    assert postprocess_answer("blue Question: what is") == "blue"
    assert postprocess_answer("triangle Short answer:") == "triangle"


def test_greedy_generate_matches_full_forward_argmax_and_ignores_left_padding():
    torch.manual_seed(0)
    model = build_tiny().eval()
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 1, 1, 3, 32, 32, generator=gen)
    ids = torch.randint(0, 240, (2, 7), generator=gen)
    ids[:, 0] = MEDIA
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # row 1 is a shorter, left-padded prompt
    ids[1, 2] = MEDIA
    with torch.no_grad():
        out = greedy_generate(model, images, ids, mask, max_new_tokens=4, eos_token_id=EOC)
        # reference: the plain forward's last-position argmax, one token at a time, row by row
        for row, start in ((0, 0), (1, 2)):
            seq = ids[row:row + 1, start:]
            want = []
            for _ in range(out.shape[1]):
                nxt = model(images[row:row + 1], seq)[0, -1].argmax()
                want.append(int(nxt))
                if nxt == EOC:
                    break
                seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
            assert out[row, :len(want)].tolist() == want
            assert all(t == EOC for t in out[row, len(want):].tolist())


def build_tiny():
    from megaflamingo.models.flamingo import build_model

    return build_model(tiny_config())


def test_evaluate_vqa_batched_equals_one_by_one_and_blanks_images(tmp_path):
    from megaflamingo.config import load_config
    from megaflamingo.data.images import ImageTransform
    from megaflamingo.data.tokenizer import load_tokenizer
    from megaflamingo.builder import build_model
    from tests.integration.test_pretrain import ROOT

    tok_dir = make_bpe_tokenizer(tmp_path / "tok", vocab_size=257)
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"model.tokenizer={tok_dir}"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    tokenizer, ids = load_tokenizer(tok_dir)
    questions = ["what colour is it?", "is it round?", "what shape is the big one here?", "why?", "how many?"]
    rows = []
    for i, question in enumerate(questions):
        Image.new("RGB", (40, 40), (40 * i, 255 - 40 * i, 128)).save(tmp_path / f"{i}.png")
        rows.append({"question_id": i, "image": f"{i}.png", "question": question, "answers": ["x"] * 10})
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = read_vqa_jsonl(tmp_path / "q.jsonl")
    transform = ImageTransform(model.vision.image_size)
    answers = []
    for item in items:  # one at a time: no padding at all
        single = evaluate_vqa(model, tokenizer, transform, [item], ids.eoc_token_id, batch_size=1)
        answers.append(single["examples"][0][1])
    assert any(answers)
    for item, answer in zip(items, answers):
        item.answers[:] = [answer] * 10
    batched = evaluate_vqa(model, tokenizer, transform, items, ids.eoc_token_id, batch_size=3)
    assert batched["count"] == len(items) and batched["accuracy"] == 100.0, (answers, batched["examples"])

    seen = []
    forward = model.hidden_states

    def record(vision_x, *args, **kwargs):
        seen.append(vision_x)
        return forward(vision_x, *args, **kwargs)

    model.hidden_states = record
    evaluate_vqa(model, tokenizer, transform, items[:2], ids.eoc_token_id, blank_images=True)
    assert seen and all(float(x.abs().max()) == 0.0 for x in seen)
