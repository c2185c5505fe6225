"""Ahead-of-time compilation of the media-attention kernels for an NVIDIA target, without a GPU.

Kept beside `triton.py` (the kernels and their launch) so that file stays one screen of kernels; the
tests call `compile_for_gpu` in a process without TRITON_INTERPRET to catch GPU-only errors on CPU.
"""

from __future__ import annotations

import torch
import triton

from megaflamingo.kernels.xattn.triton import (
    _bwd_dkdv_kernel,
    _bwd_dq_kernel,
    _bwd_preprocess_kernel,
    _fwd_kernel,
    _num_stages,
    interpreting,
)

_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_for_gpu(dtype: torch.dtype = torch.bfloat16, arch: int = 90, fused: bool = True) -> dict[str, int]:
    """Compile every kernel for an NVIDIA target without a GPU (ptxas ships with triton).

    The interpreter does not enforce GPU-only rules (constexpr-only globals, dot shapes, types),
    so the tests call this in a process without TRITON_INTERPRET to catch them on CPU machines.

    Args:
        dtype: the q/k/v dtype to compile for.
        arch: compute capability as an integer (90 = H100/H200).
        fused: compile the variant with gate, residual and stored attention (else with none).
    Returns:
        Shared memory bytes per kernel name.
    Raises:
        RuntimeError: the kernels were built for the interpreter.
        triton.CompilationError: a kernel does not compile for the target.
    """
    if interpreting():
        raise RuntimeError("compile_for_gpu needs the kernels built without TRITON_INTERPRET")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    dt = _TRITON_TYPES[dtype]
    tiles = {"BLOCK_T": 64, "BLOCK_N": 64, "BLOCK_K": 64}
    dots = {"UPCAST": False, "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32"}
    floats = ("qk_scale_log2", "sm_scale")
    pointers = {name: dt for name in ("Q", "Kp", "V", "GATE", "RES", "OUT", "O", "DO", "DQ", "DK", "DV")}
    pointers.update(TT="i32", LSE="fp32", R="fp32", TOK_LO="i32", TOK_HI="i32")
    kernels = {
        _fwd_kernel: {"HAS_GATE": fused, "HAS_RES": fused, "STORE_O": fused, **dots, **tiles},
        _bwd_preprocess_kernel: {"BLOCK_T": 64, "BLOCK_K": 64},
        _bwd_dq_kernel: {"HAS_GATE": fused, **dots, **tiles},
        _bwd_dkdv_kernel: {"HAS_GATE": fused, **dots, **tiles},
    }
    shared = {}
    for fn, constexprs in kernels.items():
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in pointers:
                signature[name] = "*" + pointers[name]
            else:
                signature[name] = "fp32" if name in floats else "i32"
        compiled = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=constexprs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": 4, "num_stages": _num_stages(dtype)},
        )
        shared[fn.__name__] = compiled.metadata.shared
    return shared
