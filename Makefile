# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv when it is missing and installs everything the project needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test lint fuzz bench fashion-mnist clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch and torchvision come from this machine's disk (pip is capped at these versions)
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

# Debian's real Fashion-MNIST, for the tests and the benchmark recipe that use it (root only).
fashion-mnist:
	@if [ ! -d $(FMNIST) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	fi

# Train a ViT on the real 8x8 digits (default recipe, configs/digits.yaml), evaluate it,
# and classify a few test digits saved as PNG files.
DEMO_RUN := runs/demo
demo: $(STAMP)
	$(VENV)/bin/vitkit train --config configs/digits.yaml --out $(DEMO_RUN) --overwrite
	$(VENV)/bin/vitkit eval $(DEMO_RUN)
	$(PY) -c "from vitkit.data import load_digits, save_samples; save_samples(load_digits(), '$(DEMO_RUN)/samples', 6)"
	$(VENV)/bin/vitkit predict $(DEMO_RUN) $(DEMO_RUN)/samples/*.png --topk 3
	@echo "run folder: $(DEMO_RUN) (config.yaml, metrics.csv, curves.png, confusion.png, best/, last/, samples/)"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) fashion-mnist lint
	$(PY) -m pytest -q

fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/test_properties.py --hypothesis-show-statistics

bench: $(STAMP)
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
