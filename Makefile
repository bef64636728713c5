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
# the four-run sweep (ResNet18/50 x pretrained/scratch) with submitit's local executor, 2 CPU processes
# a run (gloo) -> report. Without ImageNet weights in torchvision's cache, the pretrained arms say which
# file is missing and are reported as not run.
demo: $(VENV)/.installed
	$(PY) -m dr_resnet.synthetic --out $(DATA)/synthetic_raw --train 1000 --test 250 --size 256 --seed 0
	$(PY) -m dr_resnet.preprocess --src $(DATA)/synthetic_raw --dst $(DATA)/synthetic_128 --size 128
	$(PY) -m dr_resnet.describe $(DATA)/synthetic_128
	$(PY) -m launch.sweep --config configs/demo_sweep.yaml --executor local --tasks-per-node 2 \
		--cpus-per-task 1 --time 120 data.root=$(DATA)/synthetic_128

test: $(VENV)/.installed
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) bench/model_speed.py
	$(PY) bench/preprocess_speed.py
	$(PY) bench/pipeline_efficiency.py

clean:
	rm -rf $(VENV) $(DATA) runs *.egg-info .pytest_cache
