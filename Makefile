# Two commands for a fresh machine:
#   make run   installs the runtime and runs the local quickstart (the cipher task, a tiny model, 2 iterations)
#   make test  installs the test dependencies and runs the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP_RUN := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test

.PHONY: run test install install-test crd bench gpu-check gpu-check-distributed clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned first: 2.13.0 is the CPU build here; a bare `torch` pulls CUDA wheels.
$(STAMP_RUN): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[ml,operator]'
	touch $@

# Debian's prometheus is the real scraper of the metrics test; installed when apt is there.
$(STAMP_TEST): pyproject.toml $(STAMP_RUN)
	$(BIN)/pip install -q -e '.[ml,operator,test]'
	command -v prometheus >/dev/null || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null)
	touch $@

install: $(STAMP_RUN)
install-test: $(STAMP_TEST)

# One torch thread per worker: the quickstart's model is so small that a second thread
# costs more in synchronisation than it computes (0.09 s against 0.21 s a training step
# on 2 cores, and 10x worse when the cores are busy with anything else).
run: $(STAMP_RUN)
	$(BIN)/python examples/data/build_cipher.py .quickstart/data
	$(BIN)/selfreward make-tiny-model .quickstart/tiny-model --corpus .quickstart/data/corpus.txt --hidden-size 96 --layers 2
	OMP_NUM_THREADS=1 $(BIN)/selfreward run examples/quickstart.yaml

test: $(STAMP_TEST)
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=20

crd: $(STAMP_RUN)
	$(BIN)/selfreward crd -o crds/selfreward.dev_selfrewardruns.yaml

bench: $(STAMP_TEST)
	$(BIN)/python bench/pipeline.py

# One prepared check for a GPU machine, no downloads: a random 1.2B Llama stored in bf16
# through generate, judge, DPO and a checkpoint commit (exits non-zero on a wrong dtype or
# no learning), then the training launcher: torchrun + FSDP2 on NCCL (2 processes with 2+
# GPUs, else 1) against one process. DEVICE=cpu runs both with small shapes on the CPU
# (gloo for the launcher); tests/test_gpu_check.py runs the first.
DEVICE ?= cuda
gpu-check: $(STAMP_RUN)
	$(BIN)/python -P bench/gpu_check.py --device $(DEVICE)
	$(BIN)/python -P bench/gpu_check_distributed.py $(if $(filter cpu,$(DEVICE)),--cpu,)

# The launcher check alone.
gpu-check-distributed: $(STAMP_RUN)
	$(BIN)/python -P bench/gpu_check_distributed.py $(if $(filter cpu,$(DEVICE)),--cpu,)

clean:
	rm -rf .quickstart
