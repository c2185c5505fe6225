"""Metrics: each VQA mode against its script's behaviour, CIDEr against open_flamingo's own
compute_cider (pycocoevalcap), post-processing against open_flamingo's functions, ROC-AUC.

The official GT-Vision-Lab scripts are Python 2 and are not installed here: their cases below
give the value each script computes, derived line by line from the scripts (see vqa_rules.py).
The `openflamingo` mode is compared with open_flamingo 2.0.1's vqa_metric.py itself, on hand-made
files in the public VQA format (no TextVQA/VizWiz excerpt could be obtained offline)."""

from __future__ import annotations

import contextlib
import io
import json
import random
import sys
from pathlib import Path

import pytest

from megaflamingo.eval.metrics import (cider, okvqa_stem, postprocess_caption, postprocess_vqa, roc_auc,
                                       vqa_accuracy)
from megaflamingo.eval.vqa_rules import question_accuracy
from tests.eval import fixtures

OF_EVAL = Path(__import__("open_flamingo").__file__).parent / "eval"


@pytest.fixture(scope="module")
def of_eval():
    """open_flamingo's eval modules (they import each other as top-level modules)."""
    sys.path.insert(0, str(OF_EVAL))
    import coco_metric
    import vqa_metric

    yield vqa_metric, coco_metric
    sys.path.remove(str(OF_EVAL))


def ans(*answers: str, ids: bool = True, confidence: str | None = None) -> list[dict]:
    out = []
    for i, a in enumerate(answers):
        d = {"answer": a}
        if confidence:
            d["answer_confidence"] = confidence
        if ids:
            d["answer_id"] = i + 1
        out.append(d)
    return out


# (prediction, answers, official (2021), official_2017, openflamingo)
CASES = [
    ("blue", ans(*["blue"] * 2, *["green"] * 8), 0.6, 0.6, 0.6),  # 2 of 10 humans
    ("Yes", ans(*["yes"] * 10), 0.0, 1.0, 1.0),  # 2021: no normalisation when the humans agree
    ("yes.", ans(*["yes"] * 10), 0.0, 1.0, 1.0),  # punctuation, same rule
    ("1,000", ans(*["1000"] * 10), 0.0, 1.0, 1.0),  # digit-comma-digit: the comma is deleted
    ("two", ans(*["2"] * 4, *["3"] * 6), 1.0, 1.0, 1.0),  # number words, humans disagree
    ("2", ans(*["two"] * 10), 0.0, 0.0, 1.0),  # only openflamingo normalises agreeing humans
    ("the dog", ans(*["dog"] * 3, *["cat"] * 7), 0.9, 0.9, 0.9),  # articles dropped from the prediction
    ("dog", ans(*["The dog"] * 3, *["cat"] * 7), 0.9, 0.0, 0.9),  # 2017: humans get punctuation only
    ("dont", ans(*["don't"] * 4, *["no"] * 6), 1.0, 1.0, 1.0),  # contractions
    (" red\n", ans(*["red"] * 10), 1.0, 1.0, 1.0),  # whitespace is stripped from the prediction
    ("red", ans(*["red "] * 10), 1.0, 0.0, 1.0),  # 2017 does not strip the humans' answers
    ("yes", ans(*["yes"] * 10, ids=False, confidence="yes"), 0.0, 0.0, 0.0),  # no answer_id: all dropped
    ("yes", ans(*["yes"] * 10, confidence="yes"), 1.0, 1.0, 1.0),  # with answer_id: one left out
    # VizWiz-style: each "yes" subset drops all 4 yes (0); only the "no" subset scores 1 -> 1/5
    # (a per-entry leave-one-out would give 1.0)
    ("yes", ans(*["yes"] * 4, "no", ids=False), 0.2, 0.2, 0.2),
    ("yes", ans(*["yes"] * 4, "no"), 1.0, 1.0, 1.0),
]


@pytest.mark.parametrize("pred,answers,official,official_2017,openflamingo", CASES)
def test_vqa_modes_on_edge_cases(pred, answers, official, official_2017, openflamingo):
    for mode, want in (("official", official), ("official_2017", official_2017), ("openflamingo", openflamingo)):
        assert question_accuracy(pred, answers, mode) == pytest.approx(want), mode


def _vqa_files(tmp_path: Path, task: str) -> tuple[Path, Path, list[dict]]:
    spec = fixtures.vqa(tmp_path / task, task, n_train=1, n_test=12)
    questions, annotations = Path(spec["test_questions"]), Path(spec["test_annotations"])
    q = json.loads(questions.read_text())  # open_flamingo's loadRes copies these header fields
    q.update(info={}, task_type="Open-Ended", data_type="mscoco", data_subtype="val2014", license={})
    questions.write_text(json.dumps(q))
    rng = random.Random(task)
    preds = [{"question_id": x["question_id"],
              "answer": rng.choice(["red", "Red.", "blue", "two", "2", " the dog", "a cat", "yes", "green!"])}
             for x in q["questions"][::-1]]
    return questions, annotations, preds


@pytest.mark.parametrize("task", ["vqav2", "textvqa", "vizwiz"])
def test_openflamingo_mode_equals_open_flamingo_vqa_metric(tmp_path, of_eval, task):
    vqa_metric, _ = of_eval
    questions, annotations, preds = _vqa_files(tmp_path, task)
    (tmp_path / "res.json").write_text(json.dumps(preds))
    vqa = vqa_metric.VQA(str(annotations), str(questions))
    ev = vqa_metric.VQAEval(vqa, vqa.loadRes(str(tmp_path / "res.json"), str(questions)), n=2)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
    ours = vqa_accuracy(preds, questions, annotations, "openflamingo")
    assert ours["overall"] == ev.accuracy["overall"]
    assert {q: round(100 * a, 2) for q, a in ours["per_question"].items()} == ev.evalQA
    assert 0 < ours["overall"] < 100  # the predictions hit and miss
    if task == "vizwiz":  # no answer_id: the majority answer loses its own agreeing humans
        anns = json.loads(annotations.read_text())
        oracle = [{"question_id": a["question_id"], "answer": a["answers"][0]["answer"]} for a in anns["annotations"]]
        buggy = vqa_accuracy(oracle, questions, annotations, "openflamingo")["overall"]
        for a in anns["annotations"]:
            for k, d in enumerate(a["answers"]):
                d["answer_id"] = k + 1
        annotations.write_text(json.dumps(anns))
        assert vqa_accuracy(oracle, questions, annotations, "openflamingo")["overall"] == 100.0
        assert buggy == 60.0  # 4/3/3 answers: the 4 majority subsets drop all 4 majority answers (0), 6 score 1


def test_official_modes_read_files_without_answer_type(tmp_path):
    questions, annotations, preds = _vqa_files(tmp_path, "vizwiz")
    assert "answer_type" not in json.loads(annotations.read_text())["annotations"][0]
    scores = {m: vqa_accuracy(preds, questions, annotations, m)["overall"]
              for m in ("official", "official_2017", "openflamingo")}
    assert len(set(scores.values())) > 1, scores  # the modes really differ on these predictions


def test_vqa_accuracy_errors(tmp_path):
    questions, annotations, preds = _vqa_files(tmp_path, "vqav2")
    with pytest.raises(ValueError, match="unknown VQA accuracy mode"):
        vqa_accuracy(preds, questions, annotations, "vqa")
    with pytest.raises(ValueError, match="predicted twice"):
        vqa_accuracy(preds + preds[:1], questions, annotations, "official")
    with pytest.raises(ValueError, match="no question and annotation"):
        vqa_accuracy([{"question_id": -5, "answer": "x"}], questions, annotations, "official")
    with pytest.raises(FileNotFoundError):
        vqa_accuracy(preds, tmp_path / "nope.json", annotations, "official")


RAW = [" yes, it is", "blue Question: what", "triangle Short answer:", "Answer: no", "  two\n",
       'a "big" dog Output: a cat', "a man, a horse", "Output", ""]


def test_postprocessing_equals_open_flamingo(of_eval):
    vqa_metric, coco_metric = of_eval
    for text in RAW:
        assert postprocess_vqa(text) == vqa_metric.postprocess_vqa_generation(text)
        assert postprocess_caption(text) == coco_metric.postprocess_captioning_generation(text).replace('"', "")
    assert postprocess_vqa(" yes, it is") == " yes"  # no strip: the metric strips
    assert postprocess_caption('a "big" dog Output: x') == "a big dog "


def test_cider_equals_open_flamingo_compute_cider(tmp_path, of_eval, monkeypatch):
    _, coco_metric = of_eval
    import pycocoevalcap.eval as cap_eval

    class Skipped:  # SPICE downloads CoreNLP and METEOR is slow: only CIDEr is compared
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "skipped"

    monkeypatch.setattr(cap_eval, "Spice", Skipped)
    monkeypatch.setattr(cap_eval, "Meteor", Skipped)
    spec = fixtures.karpathy(tmp_path, "coco", n_train=0, n_test=6)
    refs: dict = {}
    for a in json.loads(Path(spec["annotations"]).read_text())["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    cands = {i: c for i, c in zip(refs, ["red blue on a table", "A circle, on a table!", "two dogs",
                                         "blue square on the table.", "", "yes no yes"])}
    ann = json.loads(Path(spec["annotations"]).read_text())
    ann["images"] = [{"id": i} for i in refs]
    Path(spec["annotations"]).write_text(json.dumps(ann))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": i, "caption": c} for i, c in cands.items()]))
    with contextlib.redirect_stdout(io.StringIO()):
        want = coco_metric.compute_cider(str(tmp_path / "res.json"), spec["annotations"])["CIDEr"]
    ours = cider(cands, refs)
    assert ours["score"] == pytest.approx(want, abs=1e-12) and want > 0
    assert sum(ours["per_image"].values()) / len(cands) == pytest.approx(ours["score"])
    assert ours["per_image"][4] == 0.0  # the empty caption


def test_cider_errors(monkeypatch):
    with pytest.raises(ValueError, match="no references"):
        cider({1: "a dog"}, {2: ["a dog"]})
    monkeypatch.setenv("PATH", "")
    with pytest.raises(FileNotFoundError, match="default-jre-headless"):
        cider({1: "a dog"}, {1: ["a dog"]})


def test_roc_auc():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="0/1"):
        roc_auc([0, 2], [0.2, 0.3])


def test_okvqa_stem_says_what_data_is_missing():
    import nltk

    try:
        nltk.data.find("taggers/averaged_perceptron_tagger_eng")
        nltk.data.find("corpora/wordnet")
        nltk.data.find("tokenizers/punkt_tab")
    except LookupError:
        with pytest.raises(LookupError, match="NLTK data"):
            okvqa_stem("riding horses")
        return
    assert okvqa_stem("riding horses") == "ride horse"
