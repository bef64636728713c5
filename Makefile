# The README's commands. Each target but gpu-check makes its own virtual environment (.venv) on first
# use, with the exact versions of constraints.txt (setup.cfg itself asks only for version ranges).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= data
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

.PHONY: demo ssl-proof test test-fast bench gpu-install gpu-check gpu-check-full gpu-bench clean

# The extras: dev (tests, lint, the statistics' oracles), export (ONNX), cam (captum: the demo's heat maps).
$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,export,cam]'
	touch $@

# The main job on the embedded default: synthetic EyePACS-like photos -> preprocessed 128 px dataset ->
# the four-run sweep (ResNet18/50 x pretrained/scratch) with submitit's local executor, 2 CPU processes
# a run (gloo) -> report -> the best demo model (ResNet18 from scratch) grades new raw photos (1024 px
# canvases, black borders) and draws their heat maps. Without ImageNet weights in torchvision's cache,
# the pretrained arms say which file is missing and are reported as not run.
demo: $(VENV)/.installed
	$(PY) -m dr_resnet.synthetic --out $(DATA)/synthetic_raw --train 1000 --test 250 --size 256 --seed 0 --lesion-masks
	$(PY) -m dr_resnet.preprocess --src $(DATA)/synthetic_raw --dst $(DATA)/synthetic_128 --size 128
	$(PY) -m dr_resnet.describe $(DATA)/synthetic_128
	$(PY) -m launch.sweep --config configs/demo_sweep.yaml --executor local --tasks-per-node 2 \
		--cpus-per-task 1 --time 120 data.root=$(DATA)/synthetic_128
	$(PY) -m dr_resnet.synthetic --out $(DATA)/new_photos --train 0 --test 6 --size 1024 --seed 7
	$(PY) -m dr_resnet.predict --checkpoint runs/demo/resnet18_scratch/checkpoint_best.pt \
		--images $(DATA)/new_photos/images --out runs/demo/new_photos.csv --cam runs/demo/heat_maps

# In-domain self-supervised pretraining against training from scratch, CPU-sized (docs/pretraining.md,
# docs/results/ssl.md): the demo's synthetic photos at 64 px plus 2,000 unlabelled ones of another (APTOS-like)
# dataset; the sweep pretrains a ResNet18 with BYOL once (cached in runs/backbones), fine-tunes scratch and ssl at
# 10%, 25% and 100% of the labels on 3 seeds, then probes both backbones linearly; two reports. About 2 hours
# 10 minutes on a shared 2-core machine (the pretraining 1 h 40 min of it; docs/results/ssl.md): a benchmark,
# not the demo. Without ImageNet weights the pretrained arm is reported as not run.
ssl-proof: $(VENV)/.installed
	test -f $(DATA)/synthetic_raw/train_label.csv || $(PY) -m dr_resnet.synthetic --out $(DATA)/synthetic_raw \
		--train 1000 --test 250 --size 256 --seed 0 --lesion-masks
	$(PY) -m dr_resnet.preprocess --src $(DATA)/synthetic_raw --dst $(DATA)/synthetic_64 --size 64
	test -f $(DATA)/pool_raw/train.csv || $(PY) -m dr_resnet.synthetic --out $(DATA)/pool_raw --format aptos \
		--train 2000 --test 0 --size 256 --seed 41
	$(PY) -m dr_resnet.preprocess --src $(DATA)/pool_raw --dst $(DATA)/pool_64 --size 64
	$(PY) -m launch.sweep --config configs/demo_ssl_sweep.yaml --executor local --tasks-per-node 1 --cpus-per-task 1 \
		--parallel 2 --seeds 0,1,2 data.root=$(DATA)/synthetic_64 pretrain.pools=$(DATA)/pool_64:train
	$(PY) -m launch.sweep --config configs/demo_ssl_probe.yaml --executor local --tasks-per-node 1 --cpus-per-task 1 \
		--parallel 2 --seeds 0,1,2 data.root=$(DATA)/synthetic_64 pretrain.pools=$(DATA)/pool_64:train

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest

# The developers' loop: ruff and the tests not marked slow (no SLURM cluster, no multi-process resume runs).
test-fast: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -m "not slow"

bench: $(VENV)/.installed
	$(PY) bench/model_speed.py
	$(PY) bench/preprocess_speed.py
	$(PY) bench/pipeline_efficiency.py

# On a GPU machine, with that machine's own python and
# CUDA build of torch (GPU_PYTHON; installed with --no-deps, so nothing replaces its torch):
#   gpu-check       the quick tier: the GPU tests without torch.compile (about 5 minutes on one H100-class GPU;
#                   a test whose optional package is missing there is skipped with the reason)
#   gpu-check-full  the whole tier, the compiled runs included
#   gpu-bench       the benchmark: ResNet18 eager first (its ratios within about 3 minutes), then every depth
#                   and compiled; synthetic 512 px data made once in GPU_DATA
# Logs and tables go to GPU_OUT.
GPU_PYTHON ?= python3
GPU_DATA ?= $(DATA)/gpu_512
GPU_OUT ?= gpu-check
GPU_PYTEST = PYTHONPATH=$(CURDIR) PYTHONUNBUFFERED=1 GPU_OUT=$(CURDIR)/$(GPU_OUT) $(GPU_PYTHON) -m pytest tests/test_gpu.py -v -p no:cacheprovider
gpu-install:
	$(GPU_PYTHON) -m pip install --quiet --no-deps --no-build-isolation -e . || echo "(not installed: running from the source tree)"
	mkdir -p $(GPU_OUT)
gpu-check: gpu-install
	set -o pipefail; $(GPU_PYTEST) -m "gpu and not slow" 2>&1 | tee $(GPU_OUT)/gpu_tests.log
gpu-check-full: gpu-install
	set -o pipefail; $(GPU_PYTEST) -m gpu 2>&1 | tee $(GPU_OUT)/gpu_tests_full.log
gpu-bench: gpu-install
	test -f $(GPU_DATA)/preprocess.json || { \
		PYTHONPATH=$(CURDIR) $(GPU_PYTHON) -m dr_resnet.synthetic --out $(GPU_DATA)_raw --train 800 --test 64 --size 600 --seed 0 && \
		PYTHONPATH=$(CURDIR) $(GPU_PYTHON) -m dr_resnet.preprocess --src $(GPU_DATA)_raw --dst $(GPU_DATA) --size 512; }
	set -o pipefail; PYTHONPATH=$(CURDIR) PYTHONUNBUFFERED=1 $(GPU_PYTHON) bench/gpu_throughput.py --data $(GPU_DATA) \
		--depths 18 --no-compile --worker-sweep "" --out $(GPU_OUT)/gpu_throughput_quick.md 2>&1 | tee $(GPU_OUT)/gpu_throughput_quick.log
	set -o pipefail; PYTHONPATH=$(CURDIR) PYTHONUNBUFFERED=1 $(GPU_PYTHON) bench/gpu_throughput.py --data $(GPU_DATA) \
		--out $(GPU_OUT)/gpu_throughput.md 2>&1 | tee $(GPU_OUT)/gpu_throughput.log

clean:
	rm -rf $(VENV) $(DATA) runs gpu-check *.egg-info .pytest_cache
