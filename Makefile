# rwkv_ray developer targets. `make install` creates .venv at the repo root; every other
# target depends on it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU torch for the test oracle (the official `rwkv` package). A plain `torch` would pull a
# multi-GB CUDA build; override on machines that have a different CPU wheel.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-gpu demo bench lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# Two pytest-xdist workers, a whole module at a time (module fixtures are built once).
test: install
	$(BIN)/python -m pytest -q -ra --durations=15 -n 2 --dist loadfile tests

# The GPU-only tests (kernel vs reference); tests/conftest.py defaults JAX to the CPU, so the
# platform is named here.
test-gpu: install
	JAX_PLATFORMS=cuda $(BIN)/python -m pytest -q -ra -m gpu tests

demo: install
	$(BIN)/python -m rwkv_ray.cli demo

bench: install
	$(BIN)/python benchmarks/bench_wkv_cpu.py
	$(BIN)/python benchmarks/bench_tokenizer.py

lint: install
	$(BIN)/ruff check rwkv_ray tests benchmarks jobs
	$(BIN)/ruff format --check rwkv_ray tests benchmarks jobs

format: install
	$(BIN)/ruff format rwkv_ray tests benchmarks jobs
	$(BIN)/ruff check --fix rwkv_ray tests benchmarks jobs

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
