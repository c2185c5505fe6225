"""The suite end to end on a tiny random model: every task format (generation, RICES,
classification), 1 rank == 2 ranks (one torchrun of launcher/evaluate.py), OpenFlamingo's prompts,
and the demo's easy-vqa number == evaluate.py's on the same checkpoint."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megaflamingo.eval import suite
from megaflamingo.eval.demos import random_demos, sample_order
from megaflamingo.eval.runner import Ranks, TrialSettings, build_prompts, run_trial
from megaflamingo.eval.tasks import TASKS, Example, load_task_data
from tests.assets import make_bpe_tokenizer
from tests.eval import fixtures

ROOT = Path(__file__).resolve().parents[2]
ALL = ["coco", "vqav2", "textvqa", "vizwiz", "hatefulmemes", "easyvqa"]  # flickr30k: its reader below


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model with open gates saved as a training checkpoint, its tokenizer, every fixture."""
    from megaflamingo.config import load_config

    root = tmp_path_factory.mktemp("suite")
    tok = make_bpe_tokenizer(root / "tok", vocab_size=257)
    spec_path = fixtures.write_all(root / "data")
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"model.tokenizer={tok}"])
    ev = suite.build_evaluator(cfg, None, torch.device("cpu"))
    with torch.no_grad():  # open the gates so that images and demos matter
        for name, p in ev.model.named_parameters():
            if name.endswith("gate"):
                p.fill_(1.0)
    ckpt = root / "ckpt" / "step_00000001"
    ckpt.mkdir(parents=True)
    trainable = {n: p.detach().clone() for n, p in ev.model.named_parameters() if p.requires_grad}
    torch.save({"module": trainable}, ckpt / "mp_rank_00_model_states.pt")
    spec, base = suite.read_data_spec(spec_path)
    return {"root": root, "tok": tok, "spec_path": spec_path, "spec": spec, "base": base, "ev": ev,
            "ckpt": ckpt, "cfg": cfg}


def test_evaluator_builds_the_frozen_weights_training_started_from(env):
    """A config with a random LM and tower (tiny.yaml): the evaluator draws them from train.seed,
    as training does, so a checkpoint's trainable weights meet the frozen ones they were trained
    with (it used to draw from seed 0 while train.seed is 42)."""
    from megaflamingo import build_model

    cfg = env["cfg"]
    trained_from = build_model(cfg.model, seed=cfg.train.seed).state_dict()
    other = build_model(cfg.model, seed=cfg.train.seed + 1).state_dict()
    got = env["ev"].model.state_dict()
    frozen = [n for n, p in env["ev"].model.named_parameters() if not p.requires_grad]
    assert frozen and any(not torch.equal(trained_from[n], other[n]) for n in frozen)
    for name in frozen:
        assert torch.equal(got[name], trained_from[name]), name


def test_prompts_are_openflamingo_s():
    q = Example(1, Path("q.jpg"), "what is it?", "x")
    d = [Example(2, Path("a.jpg"), "is it red?", "yes"), Example(3, Path("b.jpg"), "how many?", "two")]
    texts, images = build_prompts(TASKS["vqav2"], [q], [d], shots=2)
    assert texts == ["<image>Question:is it red? Short answer:yes<|endofchunk|>\n"
                     "<image>Question:how many? Short answer:two<|endofchunk|>\n"
                     "<image>Question:what is it? Short answer:"]
    assert images == [d + [q]]
    texts, images = build_prompts(TASKS["vqav2"], [q], [d], shots=0)  # 2 text-only demos, query image only
    assert texts[0].count("<image>") == 1 and texts[0].startswith("Question:is it red? Short answer:yes")
    assert images == [[q]]
    cap = [Example(4, Path("c.jpg"), target=" A dog. ")]
    assert build_prompts(TASKS["coco"], [q], [cap], 1)[0] == ["<image>Output:A dog.<|endofchunk|>\n<image>Output:"]
    meme = [Example(5, Path("m.png"), "hi there", "no", label=0)]
    texts, images = build_prompts(TASKS["hatefulmemes"], [Example(6, Path("n.png"), "bye")], [meme], 0)
    assert texts == ["is an image with: 'hi there' written on it. Is it hateful? Answer:no<|endofchunk|>"
                     "<image>is an image with: 'bye' written on it. Is it hateful? Answer:"]
    assert len(images[0]) == 1  # OpenFlamingo also passes the demo image here (its query sees it)


def test_one_rank_equals_two_ranks_on_every_task_format(env, tmp_path):
    settings = TrialSettings(0, batch_size=2, rices=True, rices_cache=tmp_path / "rices")
    one = suite.run_suite(env["ev"], env["spec"], env["base"], ALL, [0, 2], [42], settings, Ranks(), progress=False)
    assert len(list((tmp_path / "rices").glob("rices-*.pt"))) == len(ALL)  # features cached once per pool
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "launcher/evaluate.py", "--config", "configs/tiny.yaml", "--checkpoint", str(env["ckpt"]),
           "--data", str(env["spec_path"]), "--tasks", ",".join(ALL), "--shots", "0,2", "--rices",
           "--batch-size", "2", "--out", str(out), f"model.tokenizer={env['tok']}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((out / "results.json").read_text())
    assert two["world_size"] == 2 and "| coco | 0 | CIDEr x100 |" in (out / "results.md").read_text()
    assert len(two["trials"]) == len(one["trials"]) == 2 * len(ALL)
    for a, b in zip(one["trials"], two["trials"]):
        assert (a["task"], a["shots"], a["count"]) == (b["task"], b["shots"], b["count"])
        assert json.loads(json.dumps(a["predictions"])) == b["predictions"], a["task"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-9)
    generated = [p.get("answer", p.get("caption")) for t in one["trials"] if t["task"] != "hatefulmemes"
                 for p in t["predictions"]]
    assert len(set(generated)) > 3  # the model really generates, and not one fixed string


def test_random_demos_do_not_depend_on_batching(env):
    data = load_task_data(TASKS["vqav2"], env["spec"]["vqav2"], env["base"], need_demos=True)
    runs = [run_trial(env["ev"], TASKS["vqav2"], data, TrialSettings(2, seed=7, batch_size=b)) for b in (1, 4)]
    assert runs[0]["predictions"] == runs[1]["predictions"]


def test_scored_items_and_query_set_are_openflamingo_s_draws():
    import numpy as np

    for seed in (42, 7):
        np.random.seed(seed)  # open_flamingo: prepare_eval_samples, then get_query_set
        want = (np.random.choice(50, 10, replace=False).tolist(), np.random.choice(30, 20, replace=False).tolist())
        assert sample_order(50, 10, 30, 20, seed) == want
    assert sample_order(50, -1, 30, 2048, 1)[0] != list(range(50))  # all items, in OpenFlamingo's shuffled order
    assert len(sample_order(50, -1, 30, 2048, 1)[1]) == 30  # query set clamped to the train set
    demos = [random_demos(list(range(30)), 4, seed=1, position=p) for p in range(3)]
    assert demos[0] == random_demos(list(range(30)), 4, seed=1, position=0) and demos[0] != demos[1]


def test_flickr_reader_uses_file_stems_and_one_folder(tmp_path):
    spec = fixtures.karpathy(tmp_path, "flickr30k", n_train=2, n_test=2)
    data = load_task_data(TASKS["flickr30k"], spec, tmp_path, need_demos=True)
    assert [ex.id for ex in data.test] == ["1002", "1003"] and all(ex.image.is_file() for ex in data.test)
    assert len(data.demos) == 2 and len(data.test[0].references) == 3


def test_okvqa_needs_its_stemmer_data_or_says_so(env):
    import nltk

    data = load_task_data(TASKS["okvqa"], env["spec"]["okvqa"], env["base"], need_demos=True)
    try:
        nltk.data.find("taggers/averaged_perceptron_tagger_eng")
    except LookupError:
        with pytest.raises(LookupError, match="NLTK data"):
            run_trial(env["ev"], TASKS["okvqa"], data, TrialSettings(2, num_samples=2))
        return
    assert run_trial(env["ev"], TASKS["okvqa"], data, TrialSettings(2, num_samples=2))["count"] == 2


def test_demo_easyvqa_number_equals_evaluate_py(env, tmp_path):
    """The demo's check (`evaluate.py vqa`), the suite's easyvqa task and the original reference
    loop (megaflamingo.eval.vqa) score the same checkpoint alike."""
    from megaflamingo.eval.vqa import evaluate_vqa, read_vqa_jsonl

    ev = env["ev"]
    first = read_vqa_jsonl(env["spec"]["easyvqa"]["test"])
    answers = [evaluate_vqa(ev.model, ev.tokenizer, ev.transform, [it], ev.eoc_token_id)["examples"][0][1]
               for it in first]
    answers = [a if i % 2 == 0 else "zzz" for i, a in enumerate(answers)]  # half right, half wrong
    spec = fixtures.easyvqa(tmp_path / "e", answers=answers)
    reference = evaluate_vqa(ev.model, ev.tokenizer, ev.transform, read_vqa_jsonl(spec["test"]),
                             ev.eoc_token_id)["accuracy"]
    assert reference == pytest.approx(50.0)
    main = runpy.run_path(str(ROOT / "launcher/evaluate.py"))["main"]
    common = ["--config", "configs/tiny.yaml", "--checkpoint", str(env["ckpt"]), f"model.tokenizer={env['tok']}"]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert main(["vqa", "--data", spec["test"], "--json", str(tmp_path / "demo.json"), *common]) == 0
        (tmp_path / "spec.yaml").write_text(json.dumps({"easyvqa": spec}))
        assert main(["--tasks", "easyvqa", "--shots", "0", "--data", str(tmp_path / "spec.yaml"),
                     "--out", str(tmp_path / "out"), *common]) == 0
        assert main(["--tasks", "nope", "--data", str(tmp_path / "spec.yaml"), *common]) == 2
    finally:
        os.chdir(cwd)
    demo = json.loads((tmp_path / "demo.json").read_text())["trained"]["accuracy"]
    suite_number = json.loads((tmp_path / "out/results.json").read_text())["results"]["easyvqa"]["0"]["mean"]
    assert demo == suite_number == pytest.approx(reference)


def test_vqa_questions_and_annotations_pair_by_question_id(env):
    """The fixture's annotation list is reversed: OpenFlamingo's positional pairing would mismatch."""
    data = load_task_data(TASKS["textvqa"], env["spec"]["textvqa"], env["base"], need_demos=True)
    for ex in data.test + data.demos:
        i = int(ex.text.split()[-1].rstrip("?"))
        assert ex.references[0]["answer"] == fixtures.WORDS[i % 10] and ex.image.name == f"tv{i}.jpg"
