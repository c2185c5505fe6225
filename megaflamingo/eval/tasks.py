"""The benchmark tasks: OpenFlamingo's prompts and generation settings, and readers for each
dataset's public file format.

| task | kind | files (keys of the data spec) | demos / scored split |
|---|---|---|---|
| coco, flickr30k | caption | `karpathy` (dataset_coco.json / dataset_flickr30k.json), `images`, optional `annotations` (COCO-format captions) | Karpathy "train" / "test" |
| vqav2, okvqa, textvqa, vizwiz | vqa | `{train,test}_{questions,annotations,images}` (VQA-format JSON) | train / test files |
| hatefulmemes | classification | `train`, `test` (jsonl `{id, img, label, text}`), `images` | train / test |
| easyvqa | vqa | `test` (+ `train` for shots > 0): jsonl `{question_id, image, question, answers}` | train / test |

Prompts (OpenFlamingo `eval/models/open_flamingo.py`): caption demo `<image>Output:{caption}<|endofchunk|>`
+ "\\n", query `<image>Output:`; VQA demo `<image>Question:{q} Short answer:{a}<|endofchunk|>` + "\\n",
query `<image>Question:{q} Short answer:`; HatefulMemes demo `<image>is an image with: '{text}' written
on it. Is it hateful? Answer:{yes|no}<|endofchunk|>` with no separator. Demos use the first caption
(stripped) and the first answer. Generation: 3 beams, length penalty 0, at most 20 new tokens
for captions, 5 for VQA, 10 for TextVQA; eos `<|endofchunk|>`. easy-vqa is the demo's task, not an
OpenFlamingo benchmark: greedy, 5 tokens, and 0-shot means no demonstrations at all (the demo
model was trained on single question/answer pairs), so that it matches `make demo`'s number.

Deliberate difference: VQA questions and annotations are paired by `question_id`; OpenFlamingo's
`VQADataset` pairs them by list position (correct only when both files share one order).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable

from megaflamingo.eval.metrics import postprocess_caption, postprocess_ok_vqa, postprocess_vqa


@dataclass(frozen=True)
class Example:
    """One image with its text: a demonstration candidate or a scored item.

    `text` is the question (VQA) or the meme's text (classification); `target` is what a
    demonstration shows (first caption, first answer, class name); `references` are all captions
    (caption) or the answer dicts (VQA); `label` is the 0/1 class (classification)."""

    id: Hashable
    image: Path
    text: str = ""
    target: str = ""
    references: tuple = ()
    label: int | None = None


@dataclass(frozen=True)
class TaskSpec:
    """How OpenFlamingo evaluates one benchmark."""

    name: str
    kind: str  # "caption" | "vqa" | "classification"
    max_new_tokens: int = 5
    num_beams: int = 3
    length_penalty: float = 0.0
    zero_shot_demos: int = 2  # 0-shot = this many text-only demonstrations ("following Flamingo")
    postprocess: Callable[[str], str] = postprocess_vqa
    class_names: tuple[str, ...] = field(default=())

    def demo_prompt(self, ex: Example) -> str:
        """The demonstration's text, separator included."""
        if self.kind == "caption":
            return f"<image>Output:{ex.target.strip()}<|endofchunk|>\n"
        if self.kind == "vqa":
            return f"<image>Question:{ex.text} Short answer:{ex.target}<|endofchunk|>\n"
        return f"<image>is an image with: '{ex.text}' written on it. Is it hateful? Answer:{ex.target}<|endofchunk|>"

    def query_prompt(self, ex: Example) -> str:
        """The scored item's text, up to where the model answers."""
        if self.kind == "caption":
            return "<image>Output:"
        if self.kind == "vqa":
            return f"<image>Question:{ex.text} Short answer:"
        return f"<image>is an image with: '{ex.text}' written on it. Is it hateful? Answer:"


TASKS: dict[str, TaskSpec] = {
    "coco": TaskSpec("coco", "caption", max_new_tokens=20, postprocess=postprocess_caption),
    "flickr30k": TaskSpec("flickr30k", "caption", max_new_tokens=20, postprocess=postprocess_caption),
    "vqav2": TaskSpec("vqav2", "vqa"),
    "okvqa": TaskSpec("okvqa", "vqa", postprocess=postprocess_ok_vqa),
    "textvqa": TaskSpec("textvqa", "vqa", max_new_tokens=10),
    "vizwiz": TaskSpec("vizwiz", "vqa"),
    "hatefulmemes": TaskSpec("hatefulmemes", "classification", class_names=("no", "yes")),
    "easyvqa": TaskSpec("easyvqa", "vqa", num_beams=1, zero_shot_demos=0),
}


@dataclass
class TaskData:
    """A task's demonstration pool, scored items, and (VQA) the files the metric reads."""

    demos: list[Example]
    test: list[Example]
    questions_path: Path | None = None
    annotations_path: Path | None = None


def _path(spec: dict, key: str, base: Path, task: str) -> Path:
    if key not in spec:
        raise ValueError(f"data spec for {task!r} needs {key!r}")
    path = Path(spec[key])
    path = path if path.is_absolute() else base / path
    if not path.exists():
        raise FileNotFoundError(f"{task}.{key}: {path} does not exist")
    return path


def read_karpathy(path: Path, images: Path, split: str, task: str,
                  annotations: Path | None = None) -> list[Example]:
    """Karpathy-split captions (`{"images": [{filename, filepath, split, sentences: [{raw}], cocoid}]}`).

    COCO items are `images/filepath/filename` with id `cocoid`; Flickr30k items are
    `images/filename` with id the filename's stem (OpenFlamingo's ids). References are the
    Karpathy sentences, or the captions of a COCO-format `annotations` file when given (what
    OpenFlamingo scores against)."""
    refs: dict = {}
    if annotations is not None:
        for ann in json.loads(annotations.read_text())["annotations"]:
            refs.setdefault(ann["image_id"], []).append(ann["caption"])
    out = []
    for img in json.loads(path.read_text())["images"]:
        if img["split"] != split:
            continue
        coco = task == "coco"
        image_id = img["cocoid"] if coco else img["filename"].split(".")[0]
        file = images / img["filepath"] / img["filename"] if coco else images / img["filename"]
        sentences = [s["raw"] for s in img["sentences"]]
        out.append(Example(image_id, file, target=sentences[0],
                           references=tuple(refs.get(image_id, sentences))))
    return out


def vqa_image_path(task: str, images: Path, image_id) -> Path:
    """Where OpenFlamingo finds a VQA image (COCO names carry the image folder's split name)."""
    if task in ("vqav2", "okvqa"):
        return images / f"COCO_{images.name}_{int(image_id):012d}.jpg"
    if task == "textvqa":
        return images / f"{image_id}.jpg"
    return images / str(image_id)  # vizwiz: the image_id is the file name


def read_vqa(questions: Path, annotations: Path, images: Path, task: str) -> list[Example]:
    """VQA-format questions + annotations, paired by question_id."""
    answers = {a["question_id"]: a["answers"] for a in json.loads(annotations.read_text())["annotations"]}
    out = []
    for q in json.loads(questions.read_text())["questions"]:
        if q["question_id"] not in answers:
            raise ValueError(f"{annotations}: no annotation for question_id {q['question_id']!r}")
        refs = tuple(answers[q["question_id"]])
        out.append(Example(q["question_id"], vqa_image_path(task, images, q["image_id"]), q["question"],
                           refs[0]["answer"], refs))
    return out


def read_hateful_memes(path: Path, images: Path) -> list[Example]:
    """HatefulMemes jsonl (`{id, img, label, text}`); images looked up by file name in `images`."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            label = int(row["label"])
            out.append(Example(row["id"], images / row["img"].split("/")[-1], row["text"],
                               "yes" if label == 1 else "no", label=label))
    return out


def read_easyvqa(path: Path) -> list[Example]:
    """The demo's VQA jsonl (`{question_id, image (relative to the file), question, answers}`)."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            refs = tuple({"answer": a, "answer_id": i + 1} for i, a in enumerate(row["answers"]))
            out.append(Example(row["question_id"], path.parent / row["image"], row["question"],
                               row["answers"][0], refs))
    return out


def load_task_data(task: TaskSpec, spec: dict, base: Path, need_demos: bool) -> TaskData:
    """Read a task's files as named by its data spec (paths relative to `base`).

    Raises:
        ValueError: a key is missing; FileNotFoundError: a file is missing.
    """
    get = lambda key: _path(spec, key, base, task.name)  # noqa: E731
    if task.kind == "caption":
        ann = get("annotations") if "annotations" in spec else None
        read = lambda split: read_karpathy(get("karpathy"), get("images"), split, task.name, ann)  # noqa: E731
        return TaskData(read("train") if need_demos else [], read("test"))
    if task.name == "hatefulmemes":
        demos = read_hateful_memes(get("train"), get("images")) if need_demos else []
        return TaskData(demos, read_hateful_memes(get("test"), get("images")))
    if task.name == "easyvqa":
        demos = read_easyvqa(get("train")) if need_demos else []
        return TaskData(demos, read_easyvqa(get("test")))
    demos = read_vqa(get("train_questions"), get("train_annotations"), get("train_images"),
                     task.name) if need_demos else []
    test = read_vqa(get("test_questions"), get("test_annotations"), get("test_images"), task.name)
    return TaskData(demos, test, get("test_questions"), get("test_annotations"))
