"""Data pipeline throughput: megaflamingo's loaders vs open_flamingo's own preprocessing, same shards.

    python benchmarks/data_pipeline.py [--limit 2000] [--workers 2] [--image-size 224] [--json PATH]

Writes easy-vqa shards (launcher/prepare_data.py's writer) into a temp dir, then for each stream
runs, one after the other in this process, with the same DataLoader worker count and batch size:

- ours: `build_stream_loader` (LAION; MMC4 with argmax matching, as the PyPI reference has);
- reference: a webdataset pipeline assembled as open_flamingo 2.0.1's get_laion_dataset /
  get_mmc4_dataset do (shard list, split by worker, tar -> samples, shuffle 5000/1000, its
  filter / decode / to_tuple / batched, and its preprocess_image, preprocess_laion_text,
  preprocess_interleaved), plus only the shims it needs to run at all under webdataset 1.0.2 and
  transformers 5 (tests/data/common.py). Its MIN_KB is set to -1 and ours min_image_bytes=0 so
  both keep every ~1 KB easy-vqa image.

Each pipeline reads the shards once (one epoch); the clock starts when the first batch arrives
(worker start-up excluded for both). images/s counts images behind an `<image>` token.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from megaflamingo.config import config_from_dict  # noqa: E402
from megaflamingo.data.easyvqa import write_easy_vqa  # noqa: E402
from megaflamingo.data.loader import build_stream_loader  # noqa: E402
from megaflamingo.data.shards import expand_shards  # noqa: E402
from megaflamingo.data.tokenizer import flamingo_token_ids, load_tokenizer  # noqa: E402


def timed(batches, media_id: int, ids_of) -> dict:
    """Drain an iterator of batches; counts and clock start after the first batch."""
    start, samples, images, count = None, 0, 0, 0
    for batch in batches:
        if start is None:
            start = time.perf_counter()
            continue
        ids = ids_of(batch)
        samples += len(ids)
        images += int((ids == media_id).sum())
        count += 1
    seconds = time.perf_counter() - start
    return {"batches_timed": count, "samples": samples, "seconds": round(seconds, 3),
            "samples_per_s": round(samples / seconds, 1), "images_per_s": round(images / seconds, 1)}


def ours(cfg, name: str, tokenizer) -> dict:
    """Our loader for one epoch (until every worker's reader has moved on to epoch 1)."""
    loader = build_stream_loader(cfg, name, tokenizer, 0, 1)

    def one_epoch():
        for step in loader:
            yield from step
            readers = loader.state_dict()["readers"].values()
            if min(r["position"]["epoch"] for r in readers) >= 1:
                return

    return timed(one_epoch(), flamingo_token_ids(tokenizer).media_token_id,
                 lambda b: b["input_ids"])


def reference_pipeline(name: str, shards: list[str], tokenizer, image_size: int, batch_size: int,
                       seq_len: int, max_media: int):
    """open_flamingo 2.0.1's dataset pipeline for one stream, made runnable (see module doc)."""
    import open_clip
    import webdataset as wds

    from tests.data.common import RefTokenizer, load_reference

    ref, _ = load_reference()
    ref.MIN_KB = -1
    processor = open_clip.image_transform(image_size, is_train=False)
    tok = RefTokenizer(tokenizer)

    def tar_to_samples(src):  # the reference's nothrow grouping, minus webdataset 1.0.2's marker
        files = ref.tar_file_expander(ref.url_opener(src, handler=ref.log_and_continue),
                                      handler=ref.log_and_continue)
        return ref.group_by_keys_nothrow(f for f in files if "fname" in f)

    stages = [wds.SimpleShardList(shards), wds.split_by_worker, tar_to_samples,
              wds.shuffle(bufsize=5000, initial=1000)]
    if name == "laion":
        stages += [wds.select(ref.filter_no_caption_or_no_image), wds.decode("pilrgb"),
                   wds.to_tuple("jpg;png;jpeg", "txt"), wds.batched(batch_size, partial=False),
                   wds.map_tuple(functools.partial(ref.preprocess_image, image_processor=processor),
                                 functools.partial(ref.preprocess_laion_text, tokenizer=tok,
                                                   max_tokens=seq_len))]
    else:
        fn = functools.partial(ref.preprocess_interleaved, clip_processor=processor, tokenizer=tok,
                               sim_threshold=0.24, min_num_images=1, max_num_images=max_media,
                               max_tokens=seq_len)
        stages += [wds.to_tuple("json"), wds.map(fn, handler=ref.log_and_continue),
                   wds.batched(batch_size, partial=False)]
    return wds.DataPipeline(*stages)


def reference(name: str, shards: list[str], tokenizer, args, seq_len: int, max_media: int) -> dict:
    import webdataset as wds

    pipeline = reference_pipeline(name, shards, tokenizer, args.image_size, args.batch_size,
                                  seq_len, max_media)
    loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=args.workers)
    if name == "laion":
        ids_of = lambda b: b[1][0]  # noqa: E731
    else:
        ids_of = lambda b: torch.stack([x[0] for x in b[1]]).squeeze(1)  # noqa: E731
    return timed(iter(loader), flamingo_token_ids(tokenizer).media_token_id, ids_of)


def environment() -> dict:
    import open_clip
    import transformers
    import webdataset

    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        names = [l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                 if l.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"device": f"CPU: {cpu}, {os.cpu_count()} cores visible", "torch": torch.__version__,
            "webdataset": webdataset.__version__, "open_clip": open_clip.__version__,
            "transformers": transformers.__version__, "open_flamingo": "2.0.1",
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=2000, help="easy-vqa train images")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        from tests.assets import make_bpe_tokenizer

        summary = write_easy_vqa(Path(tmp) / "data", limit=args.limit, shard_size=100)
        tok_dir = make_bpe_tokenizer(Path(tmp) / "tok")
        tokenizer, _ = load_tokenizer(tok_dir)
        root = Path(tmp) / "data"
        results = {"env": environment(), "args": vars(args)}
        for name, seq_len, media in (("laion", 32, 1), ("mmc4", 256, 6)):
            pattern = str(root / summary[f"{name}_shards"])
            cfg = config_from_dict({
                "model": {"vision": {"open_clip_model": "ViT-L-14"}, "tokenizer": str(tok_dir)},
                "data": {name: {"shards": pattern, "batch_size": args.batch_size,
                                "seq_len": seq_len, "max_num_media": media},
                         "mmc4_options": {"min_image_bytes": 0, "matching": "argmax"},
                         "image_size": args.image_size, "workers": args.workers, "seed": 0}})
            theirs = reference(name, expand_shards(pattern), tokenizer, args, seq_len, media)
            mine = ours(cfg, name, tokenizer)
            ratio = mine["samples_per_s"] / theirs["samples_per_s"]
            results[name] = {"ours": mine, "open_flamingo": theirs, "ratio": round(ratio, 2)}
            print(f"{name}: ours {mine['samples_per_s']} samples/s ({mine['images_per_s']} images/s), "
                  f"open_flamingo {theirs['samples_per_s']} samples/s "
                  f"({theirs['images_per_s']} images/s): {ratio:.2f}x")
    print(json.dumps(results["env"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
