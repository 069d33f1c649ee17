# Two commands on a fresh machine: `make demo` (distill the shipped digits teacher, export, print the table)
# and `make test`. Both create .venv and install everything first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Without CUDA take the CPU wheel of torch: an unpinned torch would pull a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
DEMO_DIR ?= runs/demo

.PHONY: demo demo-t2i demo-flow test lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "$(TORCH_CPU)"; fi
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check onestep pipelines scripts tests
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/onestep train configs/digits/dmd2.yaml output_dir=$(DEMO_DIR)
	$(VENV)/bin/onestep bench $(DEMO_DIR) --out $(DEMO_DIR)/bench

# DMD2 on the miniature Stable Diffusion (builtin:digits-t2i), 15 minutes, then its table against the teacher.
demo-t2i: $(STAMP)
	$(VENV)/bin/onestep train configs/t2i/dmd2.yaml output_dir=$(DEMO_DIR)-t2i
	$(PY) scripts/t2i_table.py $(DEMO_DIR)-t2i --out $(DEMO_DIR)-t2i/table.json

# DMD2 on the miniature flow transformer (builtin:digits-flow, SD3's layout), 15 minutes, then its table against the
# teacher at 4/10/25 guided Euler steps under both t2i judges.
demo-flow: $(STAMP)
	$(VENV)/bin/onestep train configs/flow/dmd2.yaml output_dir=$(DEMO_DIR)-flow
	$(PY) scripts/t2i_table.py $(DEMO_DIR)-flow --out $(DEMO_DIR)-flow/table.json

lint: $(STAMP)
	$(PY) -m ruff check onestep pipelines scripts tests

clean:
	rm -rf $(VENV) runs
