# `make demo` and `make test` each build the virtual environment first when it is missing.
VENV := .venv
PY := $(VENV)/bin/python
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export OMP_NUM_THREADS ?= 2

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/mimkit demo

test: setup
	$(VENV)/bin/pytest tests

bench: setup
	$(PY) bench/data.py
	$(PY) bench/pretrain_step.py
	$(PY) bench/tokenizer_speed.py
	$(PY) bench/milan_step.py --batch 4 --steps 3
	OMP_NUM_THREADS=1 $(PY) bench/finetune.py --sizes tiny vit_b16 --batch-vit-b 2 --steps-vit-b 1

clean:
	rm -rf runs/demo .cache/demo
