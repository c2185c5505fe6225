"""Tiny hand-made datasets in each benchmark's public file format (no real data is available
offline): Karpathy COCO / Flickr30k JSON (+ a COCO-format caption file), VQAv2 / OK-VQA / TextVQA /
VizWiz question + annotation JSON (VizWiz without answer_id, as OpenFlamingo's converted files),
HatefulMemes jsonl, the demo's easy-vqa jsonl, and the data spec naming them."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

WORDS = ["red", "blue", "circle", "square", "yes", "no", "two", "the dog", "a cat", "green"]


def _image(path: Path, i: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (36, 36), ((53 * i) % 256, (97 * i + 40) % 256, (31 * i + 90) % 256)).save(path)
    return path.name


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def karpathy(root: Path, task: str, n_train: int = 5, n_test: int = 4) -> dict:
    images, annotations = [], []
    for i in range(n_train + n_test):
        split = "train" if i < n_train else "test"
        folder = ("train2014" if split == "train" else "val2014") if task == "coco" else ""
        name = f"COCO_{folder}_{i:012d}.jpg" if task == "coco" else f"{1000 + i}.jpg"
        _image(root / "images" / folder / name, i)
        sentences = [{"raw": f"{WORDS[(i + j) % 10]} {WORDS[(2 * i + j) % 10]} on a table.", "tokens": []}
                     for j in range(3)]
        images.append({"filepath": folder, "filename": name, "split": split, "cocoid": i, "sentences": sentences})
        annotations += [{"image_id": i, "id": 10 * i + j, "caption": s["raw"]} for j, s in enumerate(sentences)]
    _write(root / "karpathy.json", {"images": images, "dataset": task})
    spec = {"karpathy": str(root / "karpathy.json"), "images": str(root / "images")}
    if task == "coco":
        _write(root / "captions_val2014.json", {"annotations": annotations, "images": []})
        spec["annotations"] = str(root / "captions_val2014.json")
    return spec


def vqa(root: Path, task: str, n_train: int = 5, n_test: int = 4) -> dict:
    spec = {}
    for split, n, offset in (("train", n_train, 0), ("test", n_test, 100)):
        folder = root / ("train2014" if split == "train" else "val2014")
        questions, annotations = [], []
        for i in range(offset, offset + n):
            if task in ("vqav2", "okvqa"):
                image_id, name = i, f"COCO_{folder.name}_{i:012d}.jpg"
            elif task == "textvqa":
                image_id, name = f"tv{i}", f"tv{i}.jpg"
            else:
                image_id = name = f"VizWiz_val_{i:08d}.jpg"
            _image(folder / name, i)
            answers = [{"answer": WORDS[(i + (k % 3)) % 10], "answer_confidence": "yes"} for k in range(10)]
            if task != "vizwiz":
                for k, a in enumerate(answers):
                    a["answer_id"] = k + 1
            questions.append({"question_id": 7 * i + 1, "image_id": image_id, "question": f"what is {i}?"})
            annotations.append({"question_id": 7 * i + 1, "image_id": image_id, "answers": answers,
                                "question_type": "what", **({"answer_type": "other"} if task == "vqav2" else {})})
        annotations.reverse()  # the pairing must go by question_id, not position
        _write(root / f"{split}_q.json", {"questions": questions})
        _write(root / f"{split}_a.json", {"annotations": annotations})
        spec.update({f"{split}_questions": str(root / f"{split}_q.json"),
                     f"{split}_annotations": str(root / f"{split}_a.json"), f"{split}_images": str(folder)})
    return spec


def hateful_memes(root: Path, n_train: int = 5, n_test: int = 6) -> dict:
    for split, n, offset in (("train", n_train, 0), ("dev", n_test, 50)):
        rows = [{"id": i, "img": f"img/{i:05d}.png", "label": i % 2, "text": f"meme {WORDS[i % 10]}"}
                for i in range(offset, offset + n)]
        for i in range(offset, offset + n):
            _image(root / "img" / f"{i:05d}.png", i)
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"train": str(root / "train.jsonl"), "test": str(root / "dev.jsonl"), "images": str(root / "img")}


def easyvqa(root: Path, n: int = 4, answers: list[str] | None = None) -> dict:
    spec = {}
    for split, offset in (("test", 0), ("train", 100)):
        rows = []
        for i in range(offset, offset + n):
            _image(root / "images" / f"{i}.png", i)
            answer = answers[i - offset] if answers and split == "test" else WORDS[i % 10]
            rows.append({"question_id": i, "image": f"images/{i}.png", "question": f"what color is {i}?",
                         "answers": [answer] * 10})
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec[split] = str(root / f"{split}.jsonl")
    return spec


def write_all(root: Path) -> Path:
    """Every task's fixture under `root` and the data spec naming them; returns the spec path."""
    spec = {"coco": karpathy(root / "coco", "coco"), "flickr30k": karpathy(root / "flickr", "flickr30k"),
            "hatefulmemes": hateful_memes(root / "hm"), "easyvqa": easyvqa(root / "easyvqa")}
    for task in ("vqav2", "okvqa", "textvqa", "vizwiz"):
        spec[task] = vqa(root / task, task)
    import yaml

    (root / "data.yaml").write_text(yaml.safe_dump(spec))
    return root / "data.yaml"
