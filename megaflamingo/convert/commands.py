"""What `launcher/convert.py`'s subcommands do: build the model, fill in a training checkpoint,
write the output atomically.

Every output is first written to a temporary sibling of the target (`.<name>.tmp-*`) and renamed
into place only when complete: a failed conversion leaves the previous output as it was. Progress
goes to stderr, one line per stage.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from megaflamingo.config import Config, ConfigError, load_config, to_dict


def progress(message: str) -> None:
    """One progress line on stderr."""
    print(f"[convert {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `out` when the block succeeds.

    On an exception the temporary directory is removed and `out` (if it existed) is untouched.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(out: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `out` that replaces `out` when the block succeeds."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    try:
        yield Path(name)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    os.replace(name, out)


# ----------------------------------------------------------------------------- training checkpoints


def resolve_step_dir(path: str | Path) -> Path:
    """A run directory, its `checkpoints/` folder or one step directory -> the step directory.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: no complete checkpoint under it.
    """
    from megaflamingo.training.checkpoint import latest_checkpoint

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--checkpoint: {p} does not exist")
    if any(p.glob("*model_states.pt")):
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    found = latest_checkpoint(root)
    if found is None:
        raise ValueError(f"--checkpoint: no complete checkpoint (step_*/ with DeepSpeed model states) under {p}")
    return found


IGNORED_MODEL_KEYS = ("lm.hf_path", "tokenizer", "vision.weights", "openflamingo_checkpoint", "kernels.")
"""Model config entries that may differ between training and export: where files live, which
kernels run. Everything else shapes the weights."""


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key not in ("open_clip_config", "rope_scaling"):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return {k: v for k, v in out.items() if not k.startswith(IGNORED_MODEL_KEYS)}


def check_checkpoint_config(step_dir: Path, cfg: Config, resolved_model) -> None:
    """Refuse a checkpoint written for another model (the run's `extra_rank0.pt` records its config).

    Compared: every model config entry except `IGNORED_MODEL_KEYS`, against both the config as
    loaded and as resolved (the run may have recorded either).

    Raises:
        ConfigError: naming the model keys that differ.
    """
    extra = step_dir / "extra_rank0.pt"
    if not extra.is_file():
        return
    saved = torch.load(extra, map_location="cpu", weights_only=False).get("model_config")
    if not isinstance(saved, dict):
        return
    saved = _leaves(saved)
    for mine in (_leaves(to_dict(cfg.model)), _leaves(to_dict(resolved_model))):
        diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if not diff:
            return
    raise ConfigError(f"checkpoint {step_dir} was written for a different model config "
                      f"(model.{', model.'.join(diff[:4])} differ)")


def load_training_checkpoint(model: torch.nn.Module, step_dir: Path) -> list[str]:
    """Fill `model`'s trainable parameters from a checkpoint of any layout (`consolidate`)."""
    from megaflamingo.convert.consolidate import checkpoint_layout, consolidate, trainable_shapes

    progress(f"reading {checkpoint_layout(step_dir)} checkpoint {step_dir}")
    state = consolidate(step_dir, trainable_shapes(model))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return list(state)


def _is_zip(file: Path) -> bool:
    import zipfile

    return zipfile.is_zipfile(file)


def check_weight_files(lm_dir: str | Path | None) -> None:
    """Name a missing or truncated weight file of an LM directory before anything reads it.

    safetensors files must parse their header and cover their data; `.bin` files must be intact
    zip archives (what torch.save writes). Reads headers and zip directories only.

    Raises:
        ValueError: naming the file.
    """
    import json

    if lm_dir is None:
        return
    path = Path(lm_dir)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            for name in sorted(set(json.loads((path / index).read_text())["weight_map"].values())):
                if not (path / name).is_file():
                    raise ValueError(f"{path / index} names shard {name}, which is missing")
    for file in sorted(path.glob("*.safetensors")):
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as err:  # safetensors raises its own SafetensorError
            raise ValueError(f"cannot read {file}: {str(err).splitlines()[0]}") from None
    for file in sorted(path.glob("*.bin")):
        if not _is_zip(file):
            raise ValueError(f"cannot read {file}: not a complete torch checkpoint (truncated?)")


def build_for_export(config: str, overrides: list[str], checkpoint: str | None):
    """(run config with the model section resolved, model, tokenizer) for a config [+ checkpoint].

    Raises:
        ConfigError, ValueError, FileNotFoundError: bad config, checkpoint or weights (one line).
    """
    import dataclasses

    from megaflamingo.convert.openflamingo import load_openflamingo_checkpoint
    from megaflamingo.data.tokenizer import load_tokenizer
    from megaflamingo.models.flamingo import build_model  # not megaflamingo.builder: it imports convert/
    from megaflamingo.resolve import resolve_model

    cfg = load_config(config, overrides)
    resolved = resolve_model(cfg.model)
    step_dir = resolve_step_dir(checkpoint) if checkpoint else None
    if step_dir is not None:
        check_checkpoint_config(step_dir, cfg, resolved)
    check_weight_files(resolved.lm.hf_path)
    vision_weights = getattr(resolved.vision, "weights", None)
    if vision_weights is not None and Path(vision_weights).is_file() and not _is_zip(Path(vision_weights)):
        raise ValueError(f"cannot read model.vision.weights {vision_weights}: not a complete torch checkpoint")
    progress("building the model")
    # As training does (training/loop.py `run`): weights a config leaves random (inline LMs, towers
    # without a weights file) then equal the run's.
    torch.manual_seed(cfg.train.seed)
    model = build_model(resolved).eval()
    if resolved.openflamingo_checkpoint is not None:
        load_openflamingo_checkpoint(model, resolved.openflamingo_checkpoint)
    if step_dir is not None:
        load_training_checkpoint(model, step_dir)
    if resolved.tokenizer is None:
        raise ConfigError("model.tokenizer must be set to export (the export ships the tokenizer)")
    tokenizer, _ = load_tokenizer(resolved.tokenizer)
    return dataclasses.replace(cfg, model=resolved), model, tokenizer


# ----------------------------------------------------------------------------- subcommands


def to_hf(args) -> int:
    """`to-hf`: a Hugging Face directory (or LM + adapter with --lm-and-adapter)."""
    from megaflamingo.convert.hf import write_hf_dir, write_lm_and_adapter

    cfg, model, tokenizer = build_for_export(args.config, args.overrides, args.checkpoint)
    with atomic_dir(args.out) as tmp:
        progress(f"writing {'LM + adapter' if args.lm_and_adapter else 'Hugging Face model'} ({args.dtype})")
        if args.lm_and_adapter:
            write_lm_and_adapter(model, tokenizer, tmp, args.dtype)
        else:
            write_hf_dir(model, cfg, tokenizer, tmp, args.dtype)
    progress(f"done: {args.out}")
    return 0


def to_openflamingo(args) -> int:
    """`to-openflamingo`: the trainable state as a released-format `checkpoint.pt`."""
    from megaflamingo.convert.openflamingo import export_openflamingo_state_dict

    _, model, _ = build_for_export(args.config, args.overrides, args.checkpoint)
    with atomic_file(args.out) as tmp:
        progress("writing the OpenFlamingo checkpoint")
        torch.save(export_openflamingo_state_dict(model), tmp)
    progress(f"done: {args.out}")
    return 0


def from_openflamingo(args) -> int:
    """`from-openflamingo`: a released checkpoint.pt + its LM / vision / tokenizer -> HF directory."""
    from megaflamingo.convert.hf import write_hf_dir, write_lm_and_adapter
    from megaflamingo.convert.openflamingo import from_openflamingo as load

    progress(f"reading {args.checkpoint}")
    check_weight_files(args.lm)
    model = load(args.checkpoint, lm=args.lm, vision=args.vision, tokenizer=args.tokenizer)
    report = model.openflamingo_report
    progress(f"cross_attn_every_n_layers={report.cross_attn_every_n_layers} (from the checkpoint's keys); "
             f"{len(report.ignored)} checkpoint keys not read (frozen weights come from --lm / --vision)")
    from megaflamingo.data.tokenizer import load_tokenizer

    tokenizer, _ = load_tokenizer(args.tokenizer)
    with atomic_dir(args.out) as tmp:
        progress(f"writing {'LM + adapter' if args.lm_and_adapter else 'Hugging Face model'} ({args.dtype})")
        if args.lm_and_adapter:
            write_lm_and_adapter(model, tokenizer, tmp, args.dtype)
        else:
            write_hf_dir(model, Config(model=report.model_config), tokenizer, tmp, args.dtype)
    progress(f"done: {args.out}")
    return 0
