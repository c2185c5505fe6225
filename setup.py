"""megaflamingo: a DeepSpeed + Megatron-style 3D-parallel trainer for Flamingo-style VLMs."""

from setuptools import find_packages, setup

setup(
    name="megaflamingo",
    version="0.1.0",
    description="3D-parallel (TP x PP x ZeRO) trainer for OpenFlamingo-exact vision-language models",
    python_requires=">=3.10",
    packages=find_packages(include=["megaflamingo", "megaflamingo.*"])
    + ["megaflamingo.kernels", "megaflamingo.kernels.xattn", "megaflamingo.kernels.linear_ce"],
    # The top-level kernels/ folder installs as megaflamingo.kernels: a top-level `kernels` import
    # name would collide with the Hugging Face `kernels` package that transformers probes for.
    package_dir={"megaflamingo.kernels": "kernels"},
    install_requires=[
        # Ranges admit the GPU check machines' torch 2.11 / transformers 5.17 as well as the pins
        # the Makefile installs (DESIGN.md section 8).
        "torch>=2.11,<2.15",
        "transformers>=5.17,<5.40",
        "open_clip_torch>=3.0,<4",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tokenizers>=0.21",
    ],
    extras_require={
        "train": ["deepspeed>=0.19,<0.20", "webdataset>=1.0,<2", "scipy>=1.10"],
        "kernels": ["triton>=3.6"],
        "test": ["pytest>=8", "einops", "einops-exts", "scipy>=1.10"],
        "eval": ["scikit-learn", "scipy>=1.10"],
    },
)
