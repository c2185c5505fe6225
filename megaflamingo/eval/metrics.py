"""Benchmark metrics, offline: VQA accuracy (three scripts), CIDEr, ROC-AUC, answer post-processing.

- `vqa_accuracy(predictions, questions_path, annotations_path, mode)`: the VQA accuracy of the
  GT-Vision-Lab scripts (`official`: master 2021; `official_2017`: the VQA v2.0 release) or of
  open_flamingo 2.0.1's `vqa_metric.py` (`openflamingo`, its VizWiz leave-one-out bug included).
  The exact rules of each are in `megaflamingo/eval/vqa_rules.py`. All three score the predicted
  questions (the official scripts assert that every annotated question is predicted; here a subset
  may be scored, which gives the same number when it is the whole set) and round the overall
  percentage to 2 decimals as the scripts do. `answer_type` and `question_type` are never read.
- `postprocess_vqa`, `postprocess_caption`, `postprocess_ok_vqa`: what OpenFlamingo's
  evaluate.py makes of a raw generation (decoded without special tokens).
- `cider(candidates, references)`: pycocoevalcap's PTB tokenizer (Java) + CIDEr-D scorer, as
  COCOEvalCap runs them, without SPICE (which downloads CoreNLP). Scale x1; open_flamingo
  reports x100.
- `roc_auc(labels, scores)`: scikit-learn's `roc_auc_score`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Hashable, Sequence

from megaflamingo.eval.vqa_rules import MODES, question_accuracy

JAVA_MISSING = ("java not found: CIDEr's PTB tokenizer (pycocoevalcap) needs a Java runtime; "
                "install one, e.g. apt-get install -y default-jre-headless")


def _read_json(path: str | Path, key: str) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VQA file not found: {path}")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or key not in data:
        raise ValueError(f"{path}: expected a JSON object with a {key!r} list (VQA format)")
    return data[key]


def vqa_accuracy(predictions: Sequence[dict], questions_path: str | Path, annotations_path: str | Path,
                 mode: str = "openflamingo") -> dict:
    """VQA accuracy of predicted answers against VQA-format question and annotation files.

    Args:
        predictions: `{"question_id", "answer"}` dicts, one per scored question (answers already
            post-processed, e.g. by `postprocess_vqa`).
        questions_path: `{"questions": [{"question_id", "image_id", "question"}, ...]}`.
        annotations_path: `{"annotations": [{"question_id", "answers": [{"answer", ...}], ...}]}`.
        mode: "official" (GT-Vision-Lab/VQA master, 2021), "official_2017" (VQA v2.0 release) or
            "openflamingo" (open_flamingo 2.0.1, bugs included); see `vqa_rules`.
    Returns:
        {"overall": percent rounded to 2 decimals, "per_question": {question_id: accuracy in [0, 1]}}.
    Raises:
        ValueError: unknown mode, no predictions, a duplicated question id, or one that the
            question or annotation file does not have.
        FileNotFoundError: a file is missing.
    """
    if mode not in MODES:
        raise ValueError(f"unknown VQA accuracy mode {mode!r}; choose one of {', '.join(MODES)}")
    question_ids = {q["question_id"] for q in _read_json(questions_path, "questions")}
    annotations = {a["question_id"]: a["answers"] for a in _read_json(annotations_path, "annotations")
                   if a["question_id"] in question_ids}
    return score_vqa_answers(predictions, annotations, mode)


def score_vqa_answers(predictions: Sequence[dict], answers: dict[Hashable, list[dict]],
                      mode: str = "openflamingo") -> dict:
    """`vqa_accuracy` on answers already in memory: {question_id: the annotation's answer dicts}.

    Raises:
        ValueError: unknown mode, no predictions, a duplicated or unknown question id.
    """
    if mode not in MODES:
        raise ValueError(f"unknown VQA accuracy mode {mode!r}; choose one of {', '.join(MODES)}")
    if not predictions:
        raise ValueError("no predictions to score")
    per_question: dict[Hashable, float] = {}
    for pred in predictions:
        qid = pred["question_id"]
        if qid in per_question:
            raise ValueError(f"question_id {qid!r} is predicted twice")
        if qid not in answers:
            raise ValueError(f"question_id {qid!r} has no question and annotation to score against")
        per_question[qid] = question_accuracy(pred["answer"], answers[qid], mode)
    overall = round(100 * sum(per_question.values()) / len(per_question), 2)
    return {"overall": overall, "per_question": per_question}


def postprocess_vqa(text: str) -> str:
    """OpenFlamingo's `postprocess_vqa_generation`: the text before the first "Question", "Answer"
    or "Short", then before the first ", ". No whitespace is stripped (the metric strips)."""
    answer = re.split("Question|Answer|Short", text, maxsplit=1)[0]
    return answer.split(", ", 1)[0]


def postprocess_caption(text: str) -> str:
    """OpenFlamingo's caption rule: the text before the first "Output", with every `"` removed
    (`postprocess_captioning_generation` then evaluate.py's `.replace('"', "")`). No strip."""
    return text.split("Output", 1)[0].replace('"', "")


_OKVQA_MANUAL = {
    "police": "police", "las": "las", "vegas": "vegas", "yes": "yes", "jeans": "jean", "hell's": "hell",
    "domino's": "domino", "morning": "morn", "clothes": "cloth", "are": "are", "riding": "ride",
    "leaves": "leaf", "dangerous": "danger", "clothing": "cloth", "texting": "text", "kiting": "kite",
    "firefighters": "firefight", "ties": "tie", "married": "married", "teething": "teeth",
    "gloves": "glove", "tennis": "tennis", "dining": "dine", "directions": "direct", "waves": "wave",
    "controllers": "control", "weddings": "wed", "sometimes": "sometime", "earing": "ear",
}
_NLTK_DATA = ("corpora/wordnet", "taggers/averaged_perceptron_tagger_eng", "tokenizers/punkt_tab")


def okvqa_stem(text: str) -> str:
    """OK-VQA v1.1's answer stemming, as open_flamingo's `OKVQAStemmer`: NLTK tokens and POS tags;
    a manual table first, then words ending in "ing" -> WordNet verb lemma, plural nouns (NNS/NNPS)
    -> `inflection.singularize`; joined by spaces.

    Raises:
        LookupError: NLTK's WordNet, POS-tagger or punkt data is not installed. No PyPI package
            ships them (Debian's `wordnet-base` has WordNet only), so OK-VQA needs them placed
            under $NLTK_DATA by hand.
    """
    import inflection
    import nltk

    for resource in _NLTK_DATA:
        try:
            nltk.data.find(resource)
        except LookupError:
            raise LookupError(f"OK-VQA stemming needs NLTK data {resource!r} under $NLTK_DATA "
                              "(not available offline from PyPI)") from None
    words = []
    for word, tag in nltk.pos_tag(nltk.tokenize.word_tokenize(text)):
        if word in _OKVQA_MANUAL:
            word = _OKVQA_MANUAL[word]
        elif word.endswith("ing"):
            word = nltk.stem.WordNetLemmatizer().lemmatize(word, "v")
        elif tag.startswith("NNS") or tag.startswith("NNPS"):
            word = inflection.singularize(word)
        words.append(word)
    return " ".join(words)


def postprocess_ok_vqa(text: str) -> str:
    """OpenFlamingo's `postprocess_ok_vqa_generation`: `postprocess_vqa`, then `okvqa_stem`."""
    return okvqa_stem(postprocess_vqa(text))


def cider(candidates: dict[Hashable, str], references: dict[Hashable, list[str]]) -> dict:
    """Corpus CIDEr-D of one candidate caption per image, as pycocoevalcap computes it.

    Args:
        candidates: {image_id: generated caption}; the scored images (the IDF is over these).
        references: {image_id: human captions}; must cover every candidate.
    Returns:
        {"score": corpus CIDEr (x1), "per_image": {image_id: CIDEr}}.
    Raises:
        ValueError: no candidates, or a candidate without references.
        FileNotFoundError: no `java` on PATH (one line: how to install it).
    """
    if not candidates:
        raise ValueError("no captions to score")
    missing = [i for i in candidates if not references.get(i)]
    if missing:
        raise ValueError(f"{len(missing)} captioned images have no references, e.g. {missing[0]!r}")
    if shutil.which("java") is None:
        raise FileNotFoundError(JAVA_MISSING)
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = list(candidates)
    # One Java run for references and candidates (COCOEvalCap runs two): the tokenizer works line
    # by line (-preserveLines), so the tokens are the same.
    both = {("ref", n): [{"caption": c} for c in references[i]] for n, i in enumerate(ids)}
    both.update({("cand", n): [{"caption": candidates[i]}] for n, i in enumerate(ids)})
    tokens = PTBTokenizer().tokenize(both)
    gts = {i: tokens[("ref", n)] for n, i in enumerate(ids)}
    res = {i: tokens[("cand", n)] for n, i in enumerate(ids)}
    score, scores = Cider().compute_score(gts, res)
    return {"score": float(score), "per_image": {i: float(s) for i, s in zip(gts, scores)}}


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve (scikit-learn), as OpenFlamingo scores HatefulMemes.

    Args:
        labels: 0/1 ground truth.
        scores: the model's score for class 1, one per label.
    Raises:
        ValueError: lengths differ, a label is not 0/1, or only one class is present.
    """
    if len(labels) != len(scores):
        raise ValueError(f"{len(labels)} labels but {len(scores)} scores")
    if not set(labels) <= {0, 1}:
        raise ValueError(f"labels must be 0/1, got {sorted(set(labels))[:5]}")
    if len(set(labels)) < 2:
        raise ValueError("ROC-AUC needs both classes among the labels")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(list(labels), list(scores)))
