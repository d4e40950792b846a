# `make demo` and `make test` each set up .venv by themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Linux x86_64: this torch/torchvision pair installs together everywhere (CUDA builds that also
# run on CPU). Elsewhere (macOS, aarch64) `pip install -e .` picks the platform's normal wheels.
ifeq ($(shell uname -sm),Linux x86_64)
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1
endif

.PHONY: install browser demo test lint bench clean

$(BIN)/bbox-sft: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(if $(TORCH_PAIR),$(BIN)/pip install --quiet $(TORCH_PAIR))
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/bbox-sft

# The app's test drives a real Chromium: Debian's, installed where it is missing and apt-get can.
browser:
	@command -v chromedriver >/dev/null || ! command -v apt-get >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) || \
	  echo "could not install chromium + chromium-driver: tests/test_app.py will fail and say so"

test: install browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check bbox_sft tests bench

# DEMO_PROFILE=fast runs the reduced demo the tests run (about 3 minutes); DEMO_PROFILE=objects the
# objects task (every shape, as a labelled list; outputs/demo_objects), objects_fast its reduced version;
# DEMO_PROFILE=refer the refer task (the shape a description picks out; outputs/demo_refer), refer_fast
DEMO_PROFILE ?= full
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m bbox_sft.demo --profile $(DEMO_PROFILE)

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python bench/prepare.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/train_step.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/eval_speed.py

clean:
	rm -rf outputs data
