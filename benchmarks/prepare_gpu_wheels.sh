#!/usr/bin/env bash
# Fetch the wheels a GPU check machine lacks into .gpu_wheels/ (git-ignored), for gpu_check.sh.
#
#   bash benchmarks/prepare_gpu_wheels.sh            # here, where PyPI is reachable (~30 s)
#
# The GPU machines (H100 / H200) reach no package registry. They have Python 3.12, torch 2.11,
# triton 3.6, transformers 5.17, numpy, timm, regex, einops, scipy, msgpack, ninja, psutil,
# py-cpuinfo, nvidia-ml-py, tqdm, pyyaml, safetensors, tokenizers, huggingface-hub, setuptools,
# wheel and pytest; not deepspeed, open_clip, webdataset or open-flamingo. This script downloads
# exactly what is missing (the versions this repo's CPU stack pins, DESIGN.md section 8), with
# --no-deps each, so nothing already on the machine is replaced:
# - pure-Python wheels, and pydantic-core as a CPython 3.12 manylinux x86_64 wheel;
# - deepspeed, which PyPI ships only as an sdist: built here into a wheel with `pip wheel
#   --no-deps` (pure Python; its CUDA ops JIT-compile on first use there, with the machine's nvcc).
set -euo pipefail
cd "$(dirname "$0")/.."

PIP=${PIP:-.venv/bin/pip}
[[ -x ${PIP%% *} ]] || PIP="python3 -m pip"   # no venv yet (make setup makes one)
DEST=.gpu_wheels
# Binary wheels are chosen for the GPU machine's interpreter, not this one's.
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64)

PURE=(
  open_clip_torch==3.3.0 ftfy==6.3.1                         # vision towers
  webdataset==1.0.2 braceexpand==0.1.7                        # data shards
  open-flamingo==2.0.1 einops-exts==0.0.4                     # the baseline (installed --no-deps)
  hjson==3.1.0 pydantic==2.14.4 annotated-types==0.8.0        # deepspeed's own needs
  typing-inspection==0.4.5 typing_extensions==4.16.0
)
BINARY=(pydantic-core==2.50.5 wcwidth==0.9.4)   # pydantic-core must match pydantic's pin
SDIST=(deepspeed==0.19.8)

rm -rf "$DEST" && mkdir -p "$DEST"
# pip.conf may list local indexes that lack these names; their warnings are noise here.
quiet() { "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
for pkg in "${PURE[@]}"; do
  quiet $PIP download -q --no-deps --only-binary=:all: -d "$DEST" "$pkg" \
    || quiet $PIP wheel -q --no-deps -w "$DEST" "$pkg"   # a release without a wheel: build one
done
quiet $PIP download -q --no-deps "${TARGET[@]}" -d "$DEST" "${BINARY[@]}"
quiet $PIP wheel -q --no-deps -w "$DEST" "${SDIST[@]}"
ls -1 "$DEST"
du -sh "$DEST"
