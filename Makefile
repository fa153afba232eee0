# Two entry points: `make demo` (train -> export -> chat on the embedded default) and `make test`.
PY ?= python3
RUN ?= runs/demo
# the tested dependency set; on a GPU machine: CONSTRAINTS=constraints/gpu.txt after installing CUDA torch
CONSTRAINTS ?= constraints/cpu.txt

.PHONY: setup demo test lint

# pip only when pyproject.toml, the constraints or the Python changed, or a pinned package drifted
# (tools/setup_env.py); the first time also builds llama.cpp's tools
setup:
	@$(PY) tools/setup_env.py --constraints $(CONSTRAINTS)

demo: setup
	grpoctl train --config examples/demo.toml --output-dir $(RUN) --force
	grpoctl export $(RUN) --gguf q4_k_m --force
	grpoctl serve $(RUN) --engine llamacpp --quant q4_k_m --smoke

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint:
	$(PY) -m ruff check .
