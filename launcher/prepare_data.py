"""Write training shards (and a VQA eval set) for megaflamingo.

    python launcher/prepare_data.py easy-vqa --out data/easy_vqa [--limit 500] [--shard-size 100]
    python launcher/prepare_data.py mmc4 --docs "mmc4/docs_shard_{0..9}_v2.jsonl.zip" \
        --images mmc4/images --out data/mmc4 [--shard-size 1000] [--limit N]

`easy-vqa` reads the installed easy-vqa package (offline) and writes laion/*.tar, mmc4/*.tar,
vqa/test.jsonl and dataset.json under --out (train on its MMC4 shards with
data.mmc4_options.min_image_bytes=0: its images are ~1 KB). `mmc4` converts raw MMC4 documents
plus downloaded images into OpenFlamingo's shard format. Both print a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    easy = sub.add_parser("easy-vqa", help="shards + VQA eval set from the easy-vqa package")
    easy.add_argument("--out", required=True)
    easy.add_argument("--limit", type=int, default=None, help="images per split (default: all)")
    easy.add_argument("--shard-size", type=int, default=100)
    easy.add_argument("--seed", type=int, default=0)
    mmc4 = sub.add_parser("mmc4", help="OpenFlamingo MMC4 shards from raw jsonl + images")
    mmc4.add_argument("--docs", required=True, help="brace-expandable .jsonl / .jsonl.zip paths")
    mmc4.add_argument("--images", required=True, help="folder of downloaded images")
    mmc4.add_argument("--out", required=True)
    mmc4.add_argument("--shard-size", type=int, default=1000)
    mmc4.add_argument("--limit", type=int, default=None, help="documents (default: all)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "easy-vqa":
        from megaflamingo.data.easyvqa import write_easy_vqa

        summary = write_easy_vqa(args.out, args.limit, args.shard_size, args.seed)
    else:
        from megaflamingo.data.mmc4 import convert_mmc4
        from megaflamingo.data.shards import ShardNotFoundError, expand_shards

        try:
            docs = expand_shards(args.docs)
        except ShardNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        summary = convert_mmc4(docs, args.images, args.out, args.shard_size, args.limit)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
