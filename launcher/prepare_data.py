"""Write training shards (and a VQA eval set) for megaflamingo.

    python launcher/prepare_data.py tiny --out runs/tiny-assets
    python launcher/prepare_data.py easy-vqa --out data/easy_vqa [--limit 500] [--shard-size 100]
    python launcher/prepare_data.py mmc4 --docs "mmc4/docs_shard_{0..9}_v2.jsonl.zip" \
        --images mmc4/images --out data/mmc4 [--shard-size 1000] [--limit N]

`tiny` writes what configs/tiny.yaml needs on a fresh machine: a byte-level BPE tokenizer whose ids
are the config's (256 bytes + <|endoftext|>, then the three Flamingo tokens) under --out/tokenizer,
and small easy-vqa shards under --out/data; it prints the overrides to train with.
`easy-vqa` reads the installed easy-vqa package (offline) and writes laion/*.tar, mmc4/*.tar,
vqa/test.jsonl and dataset.json under --out (train on its MMC4 shards with
data.mmc4_options.min_image_bytes=0: its images are ~1 KB). `mmc4` converts raw MMC4 documents
plus downloaded images into OpenFlamingo's shard format. Both print a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny", help="tokenizer + shards for configs/tiny.yaml")
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--limit", type=int, default=100, help="easy-vqa images per split")
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


def byte_level_tokenizer(out_dir: Path) -> Path:
    """A byte-level BPE with no merges (256 byte tokens + <|endoftext|> = 257 ids), saved as a
    Hugging Face tokenizer directory; the Flamingo tokens are added when it is loaded (ids 257-259)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: ord(c)))}
    vocab["<|endoftext|>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.add_special_tokens(["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return out_dir


def write_tiny_assets(out: Path, limit: int) -> dict:
    """Tokenizer + easy-vqa shards for configs/tiny.yaml; returns the summary with the overrides."""
    from megaflamingo.data.easyvqa import write_easy_vqa

    tokenizer = byte_level_tokenizer(out / "tokenizer")
    summary = write_easy_vqa(out / "data", limit, shard_size=max(1, limit // 2))
    overrides = [f"model.tokenizer={tokenizer}", f"data.laion.shards={out / 'data' / 'laion' / '*.tar'}",
                 f"data.mmc4.shards={out / 'data' / 'mmc4' / '*.tar'}",
                 "data.mmc4_options.min_image_bytes=0"]
    return {"tokenizer": str(tokenizer), "data": summary, "overrides": overrides,
            "command": "deepspeed --num_gpus 2 launcher/pretrain.py --config configs/tiny.yaml "
                       + " ".join(f"'{o}'" for o in overrides)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "tiny":
        summary = write_tiny_assets(Path(args.out), args.limit)
    elif args.command == "easy-vqa":
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
