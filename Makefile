# plugdet: `make demo` (the whole chain on the synthetic mini-CUB) and `make test` (pytest). Each builds .venv itself.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
DEMO ?= runs/demo

# Nothing may reach the network at run time; Ultralytics and matplotlib write their settings to temp folders.
export NO_ALBUMENTATIONS_UPDATE := 1
export YOLO_OFFLINE := 1
export YOLO_CONFIG_DIR ?= /tmp/plugdet-yolo-config
export MPLCONFIGDIR ?= /tmp/plugdet-mpl-config
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-fast lint bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	rm -rf $(DEMO)
	$(PY) tools/make_synth_cub.py
	$(PY) tools/train_cls.py output_dir=$(DEMO)/cls
	$(PY) tools/train_det.py output_dir=$(DEMO)/det model.backbone_weights=$(DEMO)/cls/backbone.pt
	$(PY) tools/val_det.py --weights $(DEMO)/det/best.pt --out $(DEMO)/val
	$(PY) tools/predict.py --weights $(DEMO)/det/best.pt --source 'data/synth_cub/CUB_200_2011/images/*/*_000[0-1].jpg' --out $(DEMO)/predict
	@echo "demo done: curves and pictures in $(DEMO)/cls, $(DEMO)/det, $(DEMO)/val, $(DEMO)/predict"

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

# The edit loop: all but the trainings, torchrun, fresh-process tests and slow parity scales (`make test` runs all).
test-fast: $(VENV)/.installed-dev
	$(PY) -m pytest -q -m "not train and not subprocess and not slow"

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf runs build *.egg-info .pytest_cache
