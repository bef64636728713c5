# The README's commands. Each target makes its own virtual environment (.venv) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= data

.PHONY: demo test bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# The main job on the embedded default: synthetic EyePACS-like photos -> preprocessed 128 px dataset ->
# ResNet18 from scratch under torchrun with 2 CPU processes (gloo) -> results summary.
demo: $(VENV)/.installed
	$(PY) -m dr_resnet.synthetic --out $(DATA)/synthetic_raw --train 1000 --test 250 --size 256 --seed 0
	$(PY) -m dr_resnet.preprocess --src $(DATA)/synthetic_raw --dst $(DATA)/synthetic_128 --size 128
	$(PY) -m dr_resnet.describe $(DATA)/synthetic_128
	$(VENV)/bin/torchrun --standalone --nproc_per_node 2 -m dr_resnet.train --config configs/demo.yaml \
		data.root=$(DATA)/synthetic_128
	$(PY) -m dr_resnet.report runs/demo

test: $(VENV)/.installed
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) bench/model_speed.py
	$(PY) bench/preprocess_speed.py
	$(PY) bench/pipeline_efficiency.py

clean:
	rm -rf $(VENV) $(DATA) runs *.egg-info .pytest_cache
