"""Offline test assets built on the fly: a byte-level BPE tokenizer and tiny open_clip configs."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "a blue circle on a white background",
    "what color is the shape? red",
    "Question: is there a triangle? Short answer: yes",
    "the quick brown fox jumps over the lazy dog 0123456789",
    "Output: a green rectangle next to a gray square.",
] * 20

TINY_VISION = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 16,
                   "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def make_bpe_tokenizer(out_dir: Path, vocab_size: int = 300, with_pad: bool = False) -> Path:
    """Train a byte-level BPE offline and save it as a Hugging Face tokenizer directory.

    Without a pad token (the default), OpenFlamingo's rule adds `<PAD>`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>"] + (["<pad>"] if with_pad else [])
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer)
    kwargs = {"pad_token": "<pad>"} if with_pad else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", **kwargs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return out_dir
