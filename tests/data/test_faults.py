"""Fault injection: every kind of bad sample is skipped and counted under its reason; good ones arrive."""

from __future__ import annotations

import base64
import io
import itertools
import json
import tarfile

from PIL import Image

from megaflamingo.data.loader import build_stream_loader
from tests.data.common import make_config, stream


def jpeg(seed: int, size: int = 40) -> bytes:
    image = Image.new("RGB", (size, size), (seed * 40 % 256, 90, 200))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_tar(path, members: list[tuple[str, bytes]], truncate_last: bool = False) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if truncate_last:  # cut the file in the middle of the last member's data
        raw = path.read_bytes()
        cut = raw.find(members[-1][1][:64])
        path.write_bytes(raw[: cut + len(members[-1][1]) // 2])


def laion_shards(tmp_path) -> tuple[str, set[str], dict[str, int]]:
    good = [(f"g{i}", jpeg(i), f"a shape number {i}".encode()) for i in range(6)]
    members = []
    for key, image, text in good[:3]:
        members += [(f"{key}.jpg", image), (f"{key}.txt", text)]
    members += [("corrupt.jpg", b"\xff\xd8 not really a jpeg"), ("corrupt.txt", b"a cat")]
    members += [("cut.jpg", jpeg(9)[:300]), ("cut.txt", b"a cut image")]
    members += [("notext.jpg", jpeg(8))]
    members += [("noimage.txt", b"a caption without an image")]
    members += [("blank.jpg", jpeg(7)), ("blank.txt", b"   \n")]
    members += [("media.jpg", jpeg(6)), ("media.txt", b"look <image> here")]
    members += [("latin1.jpg", jpeg(5)), ("latin1.txt", "caf\xe9".encode("latin-1"))]
    for key, image, text in good[3:]:
        members += [(f"{key}.jpg", image), (f"{key}.txt", text)]
    members += [("tail.jpg", jpeg(4, size=120)), ("tail.txt", b"x" * 4000)]
    write_tar(tmp_path / "laion-0.tar", members, truncate_last=True)
    (tmp_path / "laion-1.tar").write_bytes(b"this is not a tar file at all" * 40)
    expected = {"bad_image": 2, "missing_key": 2, "empty_text": 1, "special_token_in_text": 1,
                "bad_text": 1, "truncated_member": 1}
    return str(tmp_path / "laion-0.tar"), {k for k, _, _ in good}, expected


def mmc4_doc(images: list, sentences: list[str], sims: list[list[float]]) -> bytes:
    return json.dumps({"text_list": sentences, "similarity_matrix": sims,
                       "image_info": images}).encode()


def mmc4_shard(tmp_path) -> tuple[str, set[str], dict[str, int]]:
    ok = {"image_base64": base64.b64encode(jpeg(1)).decode()}
    ok2 = {"image_base64": base64.b64encode(jpeg(2)).decode()}
    sents = ["A red square.", "A blue one.", "The end."]
    sims = [[0.5, 0.1, 0.1], [0.1, 0.5, 0.1]]
    members = [
        ("good0.json", mmc4_doc([ok, ok2], sents, sims)),
        ("badjson.json", b'{"text_list": ["unterminated'),
        ("nokey.json", json.dumps({"text_list": sents, "image_info": [ok]}).encode()),
        ("bad64.json", mmc4_doc([{"image_base64": "@@not base64@@!"}, ok2], sents, sims)),
        ("undecodable.json", mmc4_doc([ok, {"image_base64": base64.b64encode(b"junk").decode()}],
                                      sents, sims)),
        ("shape.json", mmc4_doc([ok], sents, [[0.5, 0.1]])),
        ("noimage.json", mmc4_doc([{"image_name": "lost.jpg"}], sents, [[0.5, 0.1, 0.1]])),
        ("textonly.txt", b"an MMC4 sample without json"),
        ("good1.json", mmc4_doc([ok2, ok], sents, sims)),
    ]
    write_tar(tmp_path / "mmc4-0.tar", members)
    expected = {"bad_json": 1, "missing_key": 2, "image_bad_base64": 1, "image_undecodable": 1,
                "bad_similarity": 1, "image_missing": 1, "no_images": 1}
    # bad64 and undecodable keep their good image: dropped images are counted, the doc arrives
    return str(tmp_path / "mmc4-0.tar"), {"good0", "good1", "bad64", "undecodable"}, expected


def run_epochs(cfg, name: str, tokenizer, batches: int) -> tuple[list[str], dict]:
    """Keys of the first `batches` steps (one sample each), and the skip counts by then."""
    loader = build_stream_loader(cfg, name, tokenizer, 0, 1)
    keys = []
    for _ in itertools.islice(iter(loader), batches):
        keys.extend(k.split("#")[1] for k in loader.last_keys)
    return keys, loader.skipped()


def config(tokenizer_dir, name: str, shards: str, workers: int):
    sections = {name: stream(shards, batch_size=1, max_num_media=2, seq_len=24), "workers": workers,
                "mmc4_options": {"min_image_bytes": 0, "single_image_keep_prob": 1.0}}
    return make_config(tokenizer_dir, sections)


def test_bad_laion_samples_are_counted_and_good_ones_arrive(tmp_path, tokenizer_dir, tokenizer):
    shards, good, expected = laion_shards(tmp_path)
    # one shard, file order, goods first: one epoch + the next epoch's first good sample
    keys, skipped = run_epochs(config(tokenizer_dir, "laion", shards, 0), "laion", tokenizer,
                               len(good) + 1)
    assert sorted(keys[:-1]) == sorted(good)  # each good pair exactly once per epoch
    assert skipped == expected  # each bad one exactly once, under its reason
    both = shards.replace("laion-0", "laion-{0..1}")  # + a shard that is not a tar at all
    keys, skipped = run_epochs(config(tokenizer_dir, "laion", both, 2), "laion", tokenizer,
                               3 * len(good))
    assert set(keys) == good  # several epochs: only good pairs, all of them
    assert set(skipped) == set(expected) | {"unreadable_shard"}  # read in a worker process


def test_bad_mmc4_documents_are_counted_and_good_ones_arrive(tmp_path, tokenizer_dir, tokenizer):
    shards, good, expected = mmc4_shard(tmp_path)
    keys, skipped = run_epochs(config(tokenizer_dir, "mmc4", shards, 0), "mmc4", tokenizer,
                               len(good) + 1)
    assert sorted(keys[:-1]) == sorted(good)
    assert skipped == expected
    keys, skipped = run_epochs(config(tokenizer_dir, "mmc4", shards, 2), "mmc4", tokenizer,
                               3 * len(good))
    assert set(keys) == good and set(skipped) == set(expected)


def test_a_stream_with_nothing_usable_fails_instead_of_hanging(tmp_path, tokenizer_dir, tokenizer):
    import pytest

    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    write_tar(tmp_path / "bad.tar", [("x.jpg", b"junk"), ("x.txt", b"junk")])
    for shard, message in (("empty.tar", "no sample"), ("bad.tar", "without one usable sample")):
        cfg = config(tokenizer_dir, "laion", str(tmp_path / shard), 0)
        with pytest.raises(RuntimeError, match=message):
            next(iter(build_stream_loader(cfg, "laion", tokenizer, 0, 1)))
