# Two commands do all the set-up on a fresh machine:
#   make demo   install, prepare the built-in corpus for tiny-moe, train it, evaluate it (and its
#               routing page), compare with its dense twin over 3 seeds
#   make test   install (and headless Chromium for the routing page test, if missing), run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MOE := $(VENV)/bin/moe-lm
TORCH_VERSION ?= 2.13.0
export PYTHONUNBUFFERED := 1

.PHONY: install browser demo test test-distributed bench gpu-check clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# Keep a torch that is already there; otherwise take the CPU wheel (a plain `torch`
	# requirement could pull a multi-GB CUDA build).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[dev]"
	# The MoE layers' CPU kernel (moe_lm/model/cpu_kernel.py), built once now rather than inside
	# the first training; where it cannot be, one line says why and the layers run without it.
	$(PY) -c "from moe_lm.model import cpu_kernel; cpu_kernel.load()"
	touch $@

install: $(VENV)/.installed

# The demo's steps; each one can also be run by hand (see README.md). compare-dense takes the run
# that `train` just wrote as its first MoE seed (--reuse-moe) and reuses the runs it already
# finished, so a second `make demo` only redoes prepare, train and eval.
demo: install
	$(MOE) prepare --config configs/tiny-moe.yaml --overwrite
	$(MOE) train --config configs/tiny-moe.yaml --overwrite
	$(MOE) eval runs/tiny-moe --all --html
	$(MOE) compare-dense --config configs/tiny-moe.yaml --seeds 3 --reuse-moe runs/tiny-moe

# The routing page's test opens it in headless Chromium: Debian's package is installed when it is
# missing and this machine allows it (root, or sudo without a password); otherwise it is skipped.
browser:
	sh .ci/install-browser

test: install browser
	$(PY) -m pytest tests

test-distributed: install
	$(PY) -m pytest tests/test_distributed.py

bench: install
	$(PY) benchmarks/run_all.py

# On a CUDA machine: CUDA tests, bf16 layer bench, small-moe throughput, torchrun NCCL (2 GPUs),
# a short compare-dense; one JSON + a table, under 8 minutes (benchmarks/gpu_check.py --dry-run: the plan)
gpu-check: install
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) runs data/builtin data/builtin-2k
