"""Data pipeline throughput: megaflamingo's loaders vs open_flamingo's own preprocessing, same shards.

    python benchmarks/data_pipeline.py [--limit 2000] [--workers 2] [--batch-size 16]
        [--rounds 5] [--laion-batches 110] [--mmc4-batches 24] [--image-size 224] [--json PATH]

Writes easy-vqa shards (launcher/prepare_data.py's writer) into a temp dir, then per stream runs
the two pipelines in turns, `--rounds` times (ours, theirs, then theirs, ours, ...), with the same
DataLoader worker count and batch size:

- ours: `build_stream_loader` (LAION; MMC4 with argmax matching, as the PyPI reference has); each
  round continues the stream where the previous one stopped;
- reference: a webdataset pipeline assembled as open_flamingo 2.0.1's get_laion_dataset /
  get_mmc4_dataset do (shard list, split by worker, tar -> samples, shuffle 5000/1000, its
  filter / decode / to_tuple / batched, and its preprocess_image, preprocess_laion_text,
  preprocess_interleaved), plus only the shims it needs to run at all under webdataset 1.0.2 and
  transformers 5 (tests/data/common.py), repeated epoch after epoch. Its MIN_KB is set to -1 and
  ours min_image_bytes=0 so both keep every ~1 KB easy-vqa image.

A round starts fresh workers and times the batches after the first one (worker start-up and the
reference's initial shuffle-buffer fill excluded for both). The ratio of a round compares the two
runs of that round, so slow drifts of a shared machine's load cancel; printed are the medians
over rounds (and the range of the ratios). images/s counts images behind an `<image>` token.
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


def timed(batches, media_id: int, ids_of, count_to: int) -> dict:
    """Take `count_to` + 1 batches; counts and clock start after the first batch."""
    start, samples, images, count = None, 0, 0, 0
    for batch in batches:
        if start is None:
            start = time.perf_counter()
            continue
        if count == count_to:
            break
        ids = ids_of(batch)
        samples += len(ids)
        images += int((ids == media_id).sum())
        count += 1
    seconds = time.perf_counter() - start
    return {"batches_timed": count, "samples": samples, "seconds": round(seconds, 3),
            "samples_per_s": round(samples / seconds, 1), "images_per_s": round(images / seconds, 1)}


def ours(loader, tokenizer, batches: int) -> dict:
    """One round of our loader: fresh workers, resuming where the previous round stopped."""

    def micro_batches():
        steps = iter(loader)
        try:
            for step in steps:
                yield from step
        finally:
            steps.close()  # shuts this round's workers down

    return timed(micro_batches(), flamingo_token_ids(tokenizer).media_token_id,
                 lambda b: b["input_ids"], batches)


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
    return wds.DataPipeline(*stages).repeat()


def reference(name: str, pipeline, tokenizer, workers: int, batches: int) -> dict:
    """One round of the reference pipeline: fresh workers, from the start of its shards."""
    import webdataset as wds

    loader = iter(wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=workers))
    if name == "laion":
        ids_of = lambda b: b[1][0]  # noqa: E731
    else:
        ids_of = lambda b: torch.stack([x[0] for x in b[1]]).squeeze(1)  # noqa: E731
    try:
        return timed(loader, flamingo_token_ids(tokenizer).media_token_id, ids_of, batches)
    finally:
        del loader  # shuts this round's workers down


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def compare(name: str, loader, pipeline, tokenizer, args) -> dict:
    """`args.rounds` rounds of both pipelines, in alternating order; per-round and median figures."""
    batches = getattr(args, f"{name}_batches")
    rounds = []
    for r in range(args.rounds):
        runs = {}
        for side in (("ours", "open_flamingo") if r % 2 == 0 else ("open_flamingo", "ours")):
            runs[side] = (ours(loader, tokenizer, batches) if side == "ours" else
                          reference(name, pipeline, tokenizer, args.workers, batches))
        runs["ratio"] = round(runs["ours"]["samples_per_s"] / runs["open_flamingo"]["samples_per_s"], 3)
        rounds.append(runs)
    ratios = [r["ratio"] for r in rounds]
    summary = {side: {key: median([r[side][key] for r in rounds])
                      for key in ("samples_per_s", "images_per_s")}
               for side in ("ours", "open_flamingo")}
    return {**summary, "ratio": round(median(ratios), 2), "ratio_range": [min(ratios), max(ratios)],
            "rounds": rounds}


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
    parser.add_argument("--rounds", type=int, default=5, help="turns of each pipeline per stream")
    parser.add_argument("--laion-batches", type=int, default=110, help="timed batches per round")
    parser.add_argument("--mmc4-batches", type=int, default=24, help="timed batches per round")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if min(args.rounds, args.laion_batches, args.mmc4_batches, args.limit, args.batch_size) < 1:
        parser.error("--rounds, --*-batches, --limit and --batch-size must be >= 1")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        from tests.assets import make_bpe_tokenizer

        summary = write_easy_vqa(Path(tmp) / "data", limit=args.limit, shard_size=100)
        tok_dir = make_bpe_tokenizer(Path(tmp) / "tok")
        tokenizer, _ = load_tokenizer(tok_dir)
        root = Path(tmp) / "data"
        results = {"env": environment(), "args": vars(args), "load_before": os.getloadavg()}
        for name, seq_len, media in (("laion", 32, 1), ("mmc4", 256, 6)):
            pattern = str(root / summary[f"{name}_shards"])
            cfg = config_from_dict({
                "model": {"vision": {"open_clip_model": "ViT-L-14"}, "tokenizer": str(tok_dir)},
                "data": {name: {"shards": pattern, "batch_size": args.batch_size,
                                "seq_len": seq_len, "max_num_media": media},
                         "mmc4_options": {"min_image_bytes": 0, "matching": "argmax"},
                         "image_size": args.image_size, "workers": args.workers, "seed": 0}})
            loader = build_stream_loader(cfg, name, tokenizer, 0, 1)
            pipeline = reference_pipeline(name, expand_shards(pattern), tokenizer, args.image_size,
                                          args.batch_size, seq_len, media)
            res = results[name] = compare(name, loader, pipeline, tokenizer, args)
            mine, theirs = res["ours"], res["open_flamingo"]
            print(f"{name}: ours {mine['samples_per_s']} samples/s ({mine['images_per_s']} images/s), "
                  f"open_flamingo {theirs['samples_per_s']} samples/s "
                  f"({theirs['images_per_s']} images/s): {res['ratio']:.2f}x (medians of "
                  f"{args.rounds} rounds; per-round ratios {res['ratio_range'][0]:.2f}"
                  f"-{res['ratio_range'][1]:.2f})")
        results["load_after"] = os.getloadavg()
    print(json.dumps({**results["env"], "load_avg_1_5_15": [results["load_before"],
                                                            results["load_after"]]}))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
