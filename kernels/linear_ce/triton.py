"""Triton kernels for the three row steps of the chunked cross entropy, and their launchers.

Shapes: C tokens in the chunk, V_local vocabulary columns. The specification is `reference.py`
(same function names and signatures); `__init__.py` forms the logit chunks with torch matmuls and
calls these between the all-reduces of the statistics.

One program per token row walks its V_local logits in blocks of BLOCK_V:
- `_peak_kernel`: the row maximum;
- `_exp_kernel`: overwrites the row with exp(z - peak) (base-2 exponent), sums it, and reads the
  shifted target logit;
- `_grad_kernel`: overwrites the row with scale * (exp(z - peak) / sumexp - onehot(target)).
The chunk is read three times and written twice, in place: the (C, V_local) buffer is the only
large tensor.

Interpreter (TRITON_INTERPRET=1, CPU tensors): no dots here and no libdevice, so the kernels run
as they are; keep shapes tiny (the interpreter is ~4000x slower than eager torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_NEG_INF = tl.constexpr(float("-inf"))


def interpreter_ready() -> bool:
    """True when these kernels and triton's own jit library were built for the interpreter
    (TRITON_INTERPRET=1 set before `import triton` anywhere in the process)."""
    return (not isinstance(_peak_kernel, triton.runtime.JITFunction)
            and not isinstance(tl.max, triton.runtime.JITFunction))


@triton.jit
def _peak_kernel(Z, PEAK, stride_z, V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_V)
    best = tl.full([BLOCK_V], _NEG_INF, tl.float32)
    for v0 in range(0, V, BLOCK_V):
        z = tl.load(Z + row * stride_z + v0 + offs, mask=v0 + offs < V, other=_NEG_INF)
        best = tl.maximum(best, z)
    tl.store(PEAK + row, tl.max(best, axis=0))


@triton.jit
def _exp_kernel(Z, PEAK, TGT, OUT, stride_z, C, V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_V)
    peak = tl.load(PEAK + row)
    tgt = tl.load(TGT + row)
    shifted_t = tl.load(Z + row * stride_z + tl.maximum(tgt, 0)) - peak  # read before the overwrite
    acc = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        ok = v0 + offs < V
        z = tl.load(Z + row * stride_z + v0 + offs, mask=ok, other=_NEG_INF)
        e = tl.exp2((z - peak) * 1.4426950408889634)
        acc += e
        tl.store(Z + row * stride_z + v0 + offs, e, mask=ok)
    tl.store(OUT + row, tl.sum(acc, axis=0))
    tl.store(OUT + C + row, tl.where(tgt >= 0, shifted_t, 0.0))


@triton.jit
def _grad_kernel(Z, SUMEXP, TGT, SCALE, stride_z, V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_V)
    tgt = tl.load(TGT + row)
    scale = tl.load(SCALE + row)
    factor = scale / tl.load(SUMEXP + row)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        ok = cols < V
        g = tl.load(Z + row * stride_z + cols, mask=ok, other=0.0) * factor
        g = tl.where(cols == tgt, g - scale, g)
        tl.store(Z + row * stride_z + cols, g, mask=ok)


def _block_v(vocab_local: int) -> int:
    return min(4096, triton.next_power_of_2(max(vocab_local, 16)))


def _check(logits: torch.Tensor) -> None:
    if logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(f"logit chunks must be fp32 with contiguous rows, got {logits.dtype}, strides {logits.stride()}")


def row_peak(logits: torch.Tensor) -> torch.Tensor:
    """Step 1 (see reference.row_peak). Args: logits (C, V_local) fp32. Returns: (C,) fp32."""
    _check(logits)
    C, V = logits.shape
    peak = torch.empty(C, dtype=torch.float32, device=logits.device)
    if C:
        _peak_kernel[(C,)](logits, peak, logits.stride(0), V, BLOCK_V=_block_v(V))
    return peak


def exp_shifted_(logits: torch.Tensor, peak: torch.Tensor, local_target: torch.Tensor) -> torch.Tensor:
    """Step 2, in place (see reference.exp_shifted_). Returns: (2, C) fp32 sumexp, shifted target logit."""
    _check(logits)
    C, V = logits.shape
    out = torch.empty((2, C), dtype=torch.float32, device=logits.device)
    if C:
        _exp_kernel[(C,)](logits, peak.contiguous(), local_target.contiguous(), out, logits.stride(0), C, V,
                          BLOCK_V=_block_v(V))
    return out


def exp_to_grad_(exp_shifted: torch.Tensor, sumexp: torch.Tensor, local_target: torch.Tensor,
                 scale: torch.Tensor) -> torch.Tensor:
    """Step 3, in place (see reference.exp_to_grad_). Returns: `exp_shifted`, now dL/dlogits."""
    _check(exp_shifted)
    C, V = exp_shifted.shape
    if C:
        _grad_kernel[(C,)](exp_shifted, sumexp.contiguous(), local_target.contiguous(), scale.float().contiguous(),
                           exp_shifted.stride(0), V, BLOCK_V=_block_v(V))
    return exp_shifted


def compile_for_gpu(arch: int = 90, block_v: int = 4096) -> dict[str, int]:
    """Compile the three kernels for an NVIDIA target without a GPU (ptxas ships with triton):
    the interpreter does not enforce GPU-only rules, so tests call this without TRITON_INTERPRET.

    Args:
        arch: compute capability as an integer (90 = H100/H200).
        block_v: BLOCK_V to compile for.
    Returns:
        Shared memory bytes per kernel name.
    Raises:
        RuntimeError: the kernels were built for the interpreter.
        triton.CompilationError: a kernel does not compile for the target.
    """
    if not isinstance(_peak_kernel, triton.runtime.JITFunction):
        raise RuntimeError("compile_for_gpu needs the kernels built without TRITON_INTERPRET")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointers = {"Z": "*fp32", "PEAK": "*fp32", "OUT": "*fp32", "SUMEXP": "*fp32", "SCALE": "*fp32", "TGT": "*i64"}
    shared = {}
    for fn in (_peak_kernel, _exp_kernel, _grad_kernel):
        signature = {name: "constexpr" if name == "BLOCK_V" else pointers.get(name, "i32") for name in fn.arg_names}
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs={"BLOCK_V": block_v}),
                                  target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
        shared[fn.__name__] = compiled.metadata.shared
    return shared
