# Two commands do all the set-up on a fresh machine:
#   make demo   install, prepare the built-in corpus, train tiny-moe, evaluate it, compare with dense
#   make test   install, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MOE := $(VENV)/bin/moe-lm
TORCH_VERSION ?= 2.13.0
export PYTHONUNBUFFERED := 1

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# Keep a torch that is already there; otherwise take the CPU wheel (a plain `torch`
	# requirement could pull a multi-GB CUDA build).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(MOE) prepare --overwrite

test: install
	$(PY) -m pytest tests

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs data/builtin
