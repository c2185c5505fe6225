"""Read only the slices of a Hugging Face safetensors checkpoint that one rank holds.

Shapes: D width, H heads, K head dim, V vocabulary rows; "rows" are a tensor's dim 0, "cols" its
dim 1.

`SliceReader` opens the checkpoint's safetensors files lazily (`safe_open(...).get_slice`), reads
each requested slice with one call, counts every read (`reads`), and turns a missing or truncated
shard into a one-line error naming the file. `lm_slice` maps one of our `DecoderLM` parameters and
a row/column range of it to the checkpoint slices it comes from, through the family's weight rules
(`models.families`): a one-to-one tensor is one read; a part of MPT's row-fused Wqkv is one read
at its offset; a part of GPT-NeoX's head-interleaved query_key_value is one read per local head.
Nothing here allocates more than the slice asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megaflamingo.config import LMConfig
from megaflamingo.models.decoder import head_dim
from megaflamingo.models.families import family_of
from megaflamingo.models.hf_weights import _find_rule, _weight_files

Span = tuple[int, int]
"""[start, end) along one dim."""


class SliceReader:
    """Counted slice reads from a checkpoint directory's safetensors files.

    Args:
        path: directory with model.safetensors, or shards + model.safetensors.index.json.
    Raises:
        FileNotFoundError: no safetensors file, or a shard named by the index is missing.
        ValueError: a shard is truncated or not a safetensors file (one line naming it).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        files = _weight_files(self.path)
        if any(f.suffix != ".safetensors" for f in files):
            raise ValueError(f"{self.path}: sliced loading needs safetensors weights, found {files[0].name}")
        self.reads: list[tuple[str, tuple[Span, ...]]] = []
        """(name, spans) of every read, in order."""
        self._file_of: dict[str, Path] = {}
        index = self.path / "model.safetensors.index.json"
        for file in files:
            with self._open(file) as handle:  # also validates every shard up front
                names = list(handle.keys())
            if not index.is_file():
                self._file_of.update({n: file for n in names})
        if index.is_file():
            self._file_of = {n: self.path / f for n, f in json.loads(index.read_text())["weight_map"].items()}

    def _open(self, file: Path):
        from safetensors import safe_open

        if not file.is_file():
            raise FileNotFoundError(f"checkpoint shard {file} is missing")
        try:
            return safe_open(str(file), framework="pt", device="cpu")
        except Exception as err:  # safetensors raises its own error types
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"checkpoint shard {file} is truncated or not safetensors ({first})") from None

    def names(self) -> set[str]:
        """Every tensor name in the checkpoint."""
        return set(self._file_of)

    def shape(self, name: str) -> list[int]:
        """The full shape of checkpoint tensor `name` (header only)."""
        with self._open(self._file(name)) as handle:
            return list(handle.get_slice(name).get_shape())

    def _file(self, name: str) -> Path:
        if name not in self._file_of:
            raise KeyError(f"no tensor '{name}' in the checkpoint at {self.path}")
        return self._file_of[name]

    def read(self, name: str, rows: Span | None = None, cols: Span | None = None) -> torch.Tensor:
        """Rows [r0, r1) and columns [c0, c1) (None: all) of checkpoint tensor `name`, one read.

        The file is opened for this read only and the slice copied out of its mapping.
        """
        with self._open(self._file(name)) as handle:
            part = handle.get_slice(name)
            full = part.get_shape()
            spans = tuple(s for s in (rows or (0, full[0]), cols) if s is not None) if full else ()
            index = tuple(slice(a, b) for a, b in spans)
            tensor = part[index] if index else part[:]
            # safetensors may hand back a view of its file mapping: copy, so the rank's weights
            # live in its own memory and no mapping outlives this read
            tensor = tensor.clone()
        self.reads.append((name, spans))
        return tensor


def sliceable(path: str | Path) -> bool:
    """Whether the checkpoint at `path` is safetensors (what `SliceReader` reads lazily)."""
    return all(f.suffix == ".safetensors" for f in _weight_files(Path(path)))


class StateReader(SliceReader):
    """`SliceReader`'s reads over a checkpoint read whole into memory once: for a one-rank build of
    weights that cannot be sliced lazily (pytorch_model*.bin).

    Args:
        path: the checkpoint directory.
    Raises:
        FileNotFoundError: no weight file, or a shard named by the index is missing.
    """

    def __init__(self, path: str | Path) -> None:
        from megaflamingo.models.hf_weights import read_hf_state_dict

        self.path, self.reads = Path(path), []
        self._state = read_hf_state_dict(self.path)
        self._file_of = {n: self.path for n in self._state}

    def shape(self, name: str) -> list[int]:
        """The full shape of checkpoint tensor `name`."""
        self._file(name)
        return list(self._state[name].shape)

    def read(self, name: str, rows: Span | None = None, cols: Span | None = None) -> torch.Tensor:
        """Rows [r0, r1) and columns [c0, c1) (None: all) of checkpoint tensor `name`, a copy."""
        self._file(name)  # a KeyError naming the checkpoint when absent
        tensor = self._state[name]
        spans = tuple(s for s in (rows or (0, tensor.shape[0]), cols) if s is not None) if tensor.dim() else ()
        self.reads.append((name, spans))
        return tensor[tuple(slice(a, b) for a, b in spans)].clone()


def _hf_names(reader: SliceReader, module: str, param: str, cfg: LMConfig) -> str:
    """The checkpoint's name of `module.param` (the family may store it under an alias)."""
    name, names = f"{module}.{param}", reader.names()
    if name in names:
        return name
    for alias, canonical in family_of(cfg).hf_aliases.items():
        if canonical == name and alias in names:
            return alias
    raise KeyError(f"the checkpoint at {reader.path} has no tensor '{name}'")


def lm_slice(reader: SliceReader, cfg: LMConfig, ours: str, rows: Span | None = None,
             cols: Span | None = None) -> torch.Tensor:
    """Rows/cols of our `DecoderLM` parameter `ours` (e.g. "layers.3.attn.k_proj.weight") read
    from the checkpoint, splitting fused q/k/v by reading only the wanted part.

    Args:
        reader: the checkpoint.
        cfg: the LM config (family, heads, head dim).
        ours: our parameter name (not the resized `embed_tokens.weight` rows past the checkpoint's).
        rows: [r0, r1) of our tensor's dim 0; None = all.
        cols: [c0, c1) of dim 1; None = all.
    Returns:
        The slice, in the checkpoint's dtype.
    Raises:
        KeyError: no rule or checkpoint tensor for `ours`.
    """
    module, param = ours.rsplit(".", 1)
    found = _find_rule(module, cfg.family, "ours")
    if found is None:
        raise KeyError(f"no Hugging Face {cfg.family} name for '{ours}'")
    rule, part, layer = found
    name = _hf_names(reader, rule.hf.format(i=layer), param, cfg)
    if not rule.fuse:
        return reader.read(name, rows, cols)
    total = reader.shape(name)[0]
    r0, r1 = rows or (0, total // 3)
    if rule.fuse == "rows":  # [q; k; v] by rows, equal thirds
        offset = part * total // 3
        return reader.read(name, (offset + r0, offset + r1), cols)
    K = head_dim(cfg)  # "heads": per head h, rows [h*3K + part*K, h*3K + (part+1)*K)
    if r0 % K or r1 % K:
        raise ValueError(f"{ours}: rows [{r0}, {r1}) do not cover whole heads of {K}")
    pieces = [reader.read(name, (h * 3 * K + part * K, h * 3 * K + (part + 1) * K), cols)
              for h in range(r0 // K, r1 // K)]
    return torch.cat(pieces, dim=0)
