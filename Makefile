# Two commands on a fresh clone: `make demo` and `make test`. Each sets itself up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU-only machines get this torch build (the CUDA wheels on PyPI are several GB).
# Elsewhere, point TORCH_INDEX at PyTorch's CPU wheel index, or install torch first and we reuse it.
TORCH_CPU ?= torch==2.13.0+cpu
TORCH_INDEX ?=
DEMO := data/demo
RUNS := runs
# e.g. make test PYTEST_ARGS='-m "not slow"' (skips the learning proof and the other slow tests)
PYTEST_ARGS ?=

.PHONY: setup ffmpeg demo demo-data test lint bench clean

ffmpeg:
	@if command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null; then exit 0; fi; \
	echo "ffmpeg/ffprobe missing: installing with apt-get"; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null; \
	elif command -v sudo >/dev/null && command -v apt-get >/dev/null && sudo -n true 2>/dev/null; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null; \
	else \
		echo "ERROR: ffmpeg and ffprobe are required and could not be installed automatically."; \
		echo "       Install them with your package manager (e.g. 'apt-get install ffmpeg', 'brew install ffmpeg')"; \
		echo "       so that both are on PATH, then run make again."; exit 1; \
	fi; \
	command -v ffprobe >/dev/null || { echo "ERROR: ffprobe still missing after install"; exit 1; }

$(VENV)/.ready: pyproject.toml
	@set -e; \
	echo "setup: creating the virtual environment $(VENV) (once; 'make clean' removes it)"; \
	if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "setup: reusing the installed torch $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
		if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then \
			echo "setup: installing torch with CUDA (a GPU is here; a large download, minutes)"; \
			$(PY) -m pip install -q "torch>=2.4,<3"; \
		else \
			echo "setup: installing the CPU build $(TORCH_CPU) (no GPU here; about 200 MB, a minute or two)"; \
			$(PY) -m pip install -q "$(TORCH_CPU)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) || { \
				echo "ERROR: could not install the CPU build '$(TORCH_CPU)'."; \
				echo "       Install a CPU torch into $(PYTHON) first (it is reused), or run"; \
				echo "       make TORCH_INDEX=<PyTorch CPU wheel index URL> ..."; exit 1; }; \
		fi; \
	fi; \
	echo "setup: installing this checkout (-e) with DALI, PyAV, matplotlib, pytest and ruff (a minute or two)"; \
	$(PY) -m pip install -q -e ".[test]"; \
	echo "setup: done ($(PY); TensorBoard is an extra: $(PY) -m pip install -e '.[tb]')"; \
	touch $@

setup: ffmpeg $(VENV)/.ready

# The embedded demo dataset: synthetic motion-only VP9 clips, lists and a validation pass.
$(DEMO)/.ready: prep/synth.py | setup
	$(PY) -m prep.synth $(DEMO) --replace
	$(PY) -m prep.validate $(DEMO)/train.txt --root $(DEMO)
	$(PY) -m prep.validate $(DEMO)/val.txt --root $(DEMO)
	touch $@

demo-data: $(DEMO)/.ready

# Ends with the inference command on the first validation clip, with the TSM just trained.
demo: demo-data
	@set -e; out=$(RUNS)/demo/$$(date +%Y%m%d-%H%M%S); \
	$(PY) -m demo --out $$out; \
	clip=$(DEMO)/$$(awk 'NF && $$1 !~ /^#/ {print $$1; exit}' $(DEMO)/val.txt); \
	echo; echo "python -m predict $$out/tsm $$clip"; \
	$(PY) -m predict $$out/tsm $$clip

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -v --durations=10 $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .

bench: demo-data
	$(PY) -m dali_pipes.profile configs/demo.yaml --batches 20 --baseline pyav

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache
