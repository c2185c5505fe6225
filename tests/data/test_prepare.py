"""launcher/prepare_data.py: easy-vqa captions, shard formats, the VQA eval set, MMC4 conversion."""

from __future__ import annotations

import base64
import io
import json
import runpy
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from megaflamingo.data.easyvqa import attributes, caption
from megaflamingo.data.shards import expand_shards, read_shard

REPO = Path(__file__).resolve().parents[2]


def run_cli(*argv: str) -> int:
    saved = sys.argv
    sys.argv = ["prepare_data.py", *argv]
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(REPO / "launcher" / "prepare_data.py"), run_name="__main__")
    finally:
        sys.argv = saved
    return done.value.code


def test_captions_come_from_the_questions():
    qas = [("what color is the shape?", "blue"), ("does the image contain a circle?", "yes")]
    assert caption(*attributes(qas)) == "a blue circle"
    qas = [("is there not a red shape in the image?", "no"), ("what shape is present?", "triangle")]
    assert caption(*attributes(qas)) == "a red triangle"
    assert caption(*attributes([("is no gray shape present?", "yes")])) is None
    assert caption(*attributes([("what is the teal shape?", "rectangle")])) == "a teal rectangle"


def test_easy_vqa_output_formats(easy_vqa_dir):
    summary = json.loads((easy_vqa_dir / "dataset.json").read_text())
    assert summary["laion_pairs"] == 235 and summary["uncaptioned_images"] == 5
    assert "data.mmc4_options.min_image_bytes=0" in summary["recommended_overrides"]
    pairs = [r for p in expand_shards(str(easy_vqa_dir / summary["laion_shards"]))
             for r in read_shard(p, lambda i: True)]
    assert len(pairs) == 235 and all({"jpg", "txt", "json"} <= set(r.fields) for r in pairs)
    assert pairs[0].fields["txt"].decode().startswith("a ")
    docs = [json.loads(r.fields["json"]) for p in expand_shards(str(easy_vqa_dir / summary["mmc4_shards"]))
            for r in read_shard(p, lambda i: True)]
    assert sum(len(d["image_info"]) for d in docs) == 235
    for doc in docs:
        assert len(doc["similarity_matrix"]) == len(doc["image_info"]) >= 1
        assert all(len(row) == len(doc["text_list"]) for row in doc["similarity_matrix"])
        Image.open(io.BytesIO(base64.b64decode(doc["image_info"][0]["image_base64"]))).verify()
    rows = [json.loads(line) for line in (easy_vqa_dir / "vqa" / "test.jsonl").read_text().splitlines()]
    assert len(rows) == summary["vqa_questions"] > 0
    assert (easy_vqa_dir / "vqa" / rows[0]["image"]).is_file()
    assert len(rows[0]["answers"]) == 10 and rows[0]["question"].endswith("?")


def test_mmc4_subcommand_converts_raw_documents(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (48, 48), (200, 10, 10)).save(images / "a.png")
    Image.new("RGB", (48, 48), (10, 10, 200)).save(images / "b.jpg")
    docs = [{"text_list": ["Red.", "Blue."], "similarity_matrix": [[0.3, 0.1], [0.1, 0.3]],
             "image_info": [{"image_name": "a.png"}, {"image_name": "b.jpg"}]},
            {"text_list": ["Lost."], "similarity_matrix": [[0.3]],
             "image_info": [{"image_name": "gone.jpg"}]}]
    raw = tmp_path / "docs_0.jsonl"
    raw.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    with zipfile.ZipFile(tmp_path / "docs_1.jsonl.zip", "w") as archive:
        archive.writestr("docs_1.jsonl", json.dumps(docs[0]) + "\n")
    out = tmp_path / "shards"
    pattern = f"{tmp_path / 'docs_0.jsonl'}::{tmp_path / 'docs_1.jsonl.zip'}"
    assert run_cli("mmc4", "--docs", pattern, "--images", str(images), "--out", str(out),
                   "--shard-size", "2") == 0
    written = [json.loads(r.fields["json"]) for p in sorted(out.glob("*.tar"))
               for r in read_shard(str(p), lambda i: True)]
    assert len(written) == 3 and len(list(out.glob("*.tar"))) == 2
    assert all("image_base64" in info for info in written[0]["image_info"])
    assert "image_base64" not in written[1]["image_info"][0]  # not downloaded: left out, as OF does
    assert run_cli("mmc4", "--docs", str(tmp_path / "nope_{0..3}.jsonl"), "--images", str(images),
                   "--out", str(out)) == 2
