"""The text tokenizer, with OpenFlamingo's added tokens, and the ids the model needs.

OpenFlamingo (reference §2.1, §2.7) adds `<|endofchunk|>` and `<image>` as additional special
tokens, in that order, then `<PAD>` as the pad token only if the tokenizer has none. The model's
embedding is resized to len(tokenizer), which can be fewer rows than the LM's padded table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MEDIA_TOKEN = "<image>"
EOC_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<PAD>"


@dataclass(frozen=True)
class FlamingoTokens:
    """Token ids the model and the data pipelines agree on."""

    media_token_id: int
    eoc_token_id: int
    pad_token_id: int
    eos_token_id: int | None
    vocab_size: int
    """len(tokenizer): rows of the resized embedding."""


def add_flamingo_tokens(tokenizer) -> FlamingoTokens:
    """Add `<|endofchunk|>`, `<image>` (and `<PAD>` when missing) exactly as OpenFlamingo does.

    Args:
        tokenizer: a Hugging Face tokenizer; modified in place.
    Returns:
        The ids of the added tokens and the new vocabulary size.
    """
    tokenizer.add_special_tokens({"additional_special_tokens": [EOC_TOKEN, MEDIA_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return flamingo_token_ids(tokenizer)


def flamingo_token_ids(tokenizer) -> FlamingoTokens:
    """Read the Flamingo token ids off a tokenizer that already has them."""
    # OpenFlamingo takes the last id of encode(...): robust to tokenizers that prepend BOS.
    media = tokenizer.encode(MEDIA_TOKEN)[-1]
    eoc = tokenizer.encode(EOC_TOKEN)[-1]
    if tokenizer.convert_ids_to_tokens(media) != MEDIA_TOKEN:
        raise ValueError(f"tokenizer does not have a single {MEDIA_TOKEN} token")
    return FlamingoTokens(
        media_token_id=media,
        eoc_token_id=eoc,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        vocab_size=len(tokenizer),
    )


def load_tokenizer(path: str | Path):
    """Load a local Hugging Face tokenizer directory and add the Flamingo tokens.

    Args:
        path: directory with tokenizer.json / tokenizer_config.json (or a GGUF-backed dir).
    Returns:
        (tokenizer, FlamingoTokens).
    Raises:
        FileNotFoundError: the directory does not exist.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return tokenizer, add_flamingo_tokens(tokenizer)
