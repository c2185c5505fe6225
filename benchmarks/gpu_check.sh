#!/usr/bin/env bash
# One prepared check on a GPU machine that reaches no package registry (H100 / H200; torch 2.11,
# triton 3.6, transformers 5.17 preinstalled; no deepspeed, open_clip, webdataset, open-flamingo).
#
#   here, first:  bash benchmarks/prepare_gpu_wheels.sh          # wheels into .gpu_wheels/ (git-ignored)
#   there:        bash benchmarks/gpu_check.sh "$OUT"            # device tool: carry [".gpu_wheels"], timeout_s 600
#   dry run here: bash benchmarks/gpu_check.sh --cpu-dry-run /tmp/gpu-check   # CPU, tiny config, no install
#
# Steps, each under its own time limit so one failure cannot eat the budget (limits sum to 8 min;
# expected ~4-5 min on an H100):
#   1. install   the carried wheels (pip --no-index --find-links), open-flamingo --no-deps, and this
#                repo editable; then import everything once                      limit  60 s
#   2. gpu tests pytest -m gpu (Triton kernels natively, other CUDA-only tests)  limit 100 s
#   3. xattn     benchmarks/xattn.py --quick: cross-attention fwd+bwd, Triton vs SDPA vs gather
#                                                                                 limit  70 s
#   4. tflops 3B OpenFlamingo-3B shapes (MPT-1B + ViT-L/14, xattn every layer), bf16, B=8, vs
#                open_flamingo in the same process                               limit 110 s
#   5. tflops 9B OpenFlamingo-9B shapes (MPT-7B + ViT-L/14, xattn every 4th), bf16, B=4, vs
#                open_flamingo in the same process                               limit 140 s
#                (4 and 5 time megaflamingo.training.step, the step function training runs; with no
#                --config, benchmarks/tflops.py picks the 3B shapes on an 80 GB GPU, 9B on >= 120 GB)
# OUTDIR gets results.md (environment, one section per step: status, wall time, output tail, and
# a summary table), all.log (every step's full output) and the benchmarks' JSON files: at most 5
# files, flat, as the device tool brings back.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [[ "${1:-}" == "--cpu-dry-run" ]]; then DRY=1; shift; fi
OUTDIR=${1:?usage: benchmarks/gpu_check.sh [--cpu-dry-run] OUTDIR}
mkdir -p "$OUTDIR"
RESULTS="$OUTDIR/results.md"
ALL_LOG="$OUTDIR/all.log"
: >"$ALL_LOG"

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ((DRY)); then
  PY=${PY:-.venv/bin/python}
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  CFG_3B=configs/tiny.yaml CFG_9B=configs/tiny.yaml   # the same commands at tiny shapes
  TFLOPS_ARGS=(--steps 2 --warmup 1)
else
  PY=${PY:-python3}
  export DS_ACCELERATOR=cuda   # tests/conftest.py defaults it to cpu
  CFG_3B=configs/openflamingo-3b.yaml CFG_9B=configs/openflamingo-9b.yaml
  TFLOPS_ARGS=(--steps 10 --warmup 3)
fi

declare -a SUMMARY=()

# run_step NAME LIMIT_S CMD...: run under `timeout`, log, and append a section to results.md.
run_step() {
  local name=$1 limit=$2
  shift 2
  local log
  log=$(mktemp)
  local start=$SECONDS
  echo "[gpu_check] $name (limit ${limit}s): $*" >&2
  timeout --kill-after=15 "$limit" "$@" >"$log" 2>&1
  local rc=$? wall=$((SECONDS - start)) status
  case $rc in
    0) status=ok ;;
    5) status="no tests collected" ;;
    124 | 137) status="TIMEOUT after ${limit}s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  {
    echo "## $name: $status, ${wall}s (limit ${limit}s)"
    echo
    echo '```'
    echo "\$ $*"
    tail -n 60 "$log"
    echo '```'
    echo
  } >>"$RESULTS"
  { echo "===== $name: $status, ${wall}s: $*"; cat "$log"; echo; } >>"$ALL_LOG"
  rm -f "$log"
  SUMMARY+=("| $name | $status | $wall | $limit |")
  echo "[gpu_check] $name: $status (${wall}s)" >&2
  return 0
}

install_wheels() {
  local w=.gpu_wheels
  ls "$w"/*.whl >/dev/null || { echo "no wheels in $w: run benchmarks/prepare_gpu_wheels.sh first"; return 1; }
  # Resolve against what the machine has plus the folder; if that fails (a preinstalled package
  # too old for a pin), install the folder as is, without dependency checks.
  "$PY" -m pip install -q --no-index --find-links "$w" deepspeed open_clip_torch webdataset einops-exts \
    || "$PY" -m pip install -q --no-index --no-deps "$w"/*.whl || return 1
  "$PY" -m pip install -q --no-index --no-deps "$w"/open_flamingo-*.whl || return 1  # its pins are from 2023
  if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .; then
    # megaflamingo.kernels lives in kernels/ (setup.py package_dir); without an install, link it.
    echo "editable install failed: linking kernels/ into the package and using PYTHONPATH"
    ln -sfn ../kernels megaflamingo/kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PY" - <<'EOF'
import importlib.metadata as md
import deepspeed, open_clip, open_flamingo, torch, webdataset  # noqa: F401
import megaflamingo.kernels.xattn  # noqa: F401
from deepspeed.accelerator import get_accelerator
names = ("torch", "triton", "transformers", "deepspeed", "open_clip_torch", "open-flamingo", "webdataset")
print(" ".join(f"{n}={md.version(n)}" for n in names))
print("deepspeed accelerator:", get_accelerator().device_name(), "| cuda:", torch.cuda.is_available())
EOF
}

{
  echo "# megaflamingo GPU check$( ((DRY)) && echo ' (CPU dry run: tiny config, no install)')"
  echo
  echo "date: $(date -u +%FT%TZ)  "
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo 'unknown (no .git in this copy)')  "
  echo "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)  "
  echo "python: $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1)"
  echo
} >"$RESULTS"

if ((DRY)); then
  SUMMARY+=("| install | skipped (dry run) | 0 | 60 |")
  echo -e "## install: skipped (dry run: the local venv has everything)\n" >>"$RESULTS"
else
  run_step install 60 install_wheels
  if [[ -L megaflamingo/kernels ]]; then export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; fi
fi
run_step "gpu tests" 100 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
run_step xattn 70 "$PY" benchmarks/xattn.py --quick --json "$OUTDIR/xattn.json"
run_step "tflops 3B" 110 "$PY" benchmarks/tflops.py --config "$CFG_3B" "${TFLOPS_ARGS[@]}" --micro-batch 8 \
  --baseline openflamingo --json "$OUTDIR/tflops-3b.json" train.precision=bf16
run_step "tflops 9B" 140 "$PY" benchmarks/tflops.py --config "$CFG_9B" "${TFLOPS_ARGS[@]}" --micro-batch 4 \
  --baseline openflamingo --json "$OUTDIR/tflops-9b.json" train.precision=bf16

{
  echo "## Summary"
  echo
  echo "| step | status | wall s | limit s |"
  echo "|---|---|---:|---:|"
  printf '%s\n' "${SUMMARY[@]}"
  echo
  "$PY" - "$OUTDIR" <<'EOF'
import json, sys
from pathlib import Path

rows = []
for name in ("tflops-3b", "tflops-9b"):
    path = Path(sys.argv[1]) / f"{name}.json"
    if not path.is_file():
        rows.append(f"| {name} | no result | | | | | |")
        continue
    r = json.loads(path.read_text())
    pct = lambda x: "-" if x is None else f"{x:.1%}"  # noqa: E731
    for run, m in r["runs"].items():
        if "error" in m:
            rows.append(f"| {name} | {run} | {m['error'][:80]} | | | | |")
            continue
        rows.append(f"| {name} | {run} | {m['samples_per_s']:.3g} | {m['tflops_true']:.3g} | {pct(m['mfu'])} "
                    f"| {pct(m['mfu_6n_all'])} | {m['peak_memory_gib']:.1f} |")
    if r.get("speedup_vs_baseline"):
        rows.append(f"| {name} | megaflamingo / open_flamingo | {r['speedup_vs_baseline']:.2f}x | | | | |")
print("| run | model | samples/s/GPU | true TFLOP/s | true MFU | 6N-all MFU | peak GiB |")
print("|---|---|---:|---:|---:|---:|---:|")
print("\n".join(rows))
EOF
} >>"$RESULTS" 2>&1

echo "[gpu_check] wrote $RESULTS" >&2
