# make test   - create .venv if missing, install, run the whole suite (what CI runs)
# make demo   - build a bundle from a tiny model made in code and generate an image with elite-run
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.elite-installed
DEMO := demo_out
# loadgroup: the HTTP service's tests share one worker and one service (tests/conftest.py XDIST_FILE_GROUPS).
PYTEST_ARGS ?= -n 2 --dist loadgroup

.PHONY: test demo typecheck venv

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch==2.13.0 is the CPU wheel on this machine's disk; a bare `torch` may pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	# serve: Ray Serve + FastAPI for `elite-run serve` (none of it pulls torch; the runtime stays torch-free).
	$(BIN)/python -m pip install -q -e '.[export,plugin,dev,serve]'
	# --no-deps: clip-anytorch only for CLIP's BPE vocabulary file (the toy tokenizer); tensorrt-stubs
	# only for type-checking the TensorRT layer (its dependency, TensorRT itself, is not installable here).
	$(BIN)/python -m pip install -q --no-deps clip-anytorch==2.6.0 tensorrt-stubs==10.13.0.35.1
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

typecheck: $(STAMP)
	$(BIN)/python scripts/typecheck_trt.py

demo: $(STAMP)
	$(BIN)/elite-export build --toy -o $(DEMO)/bundle
	$(BIN)/elite-run --bundle $(DEMO)/bundle --image calib/concepts/7.jpg --mask calib/concepts/7_bg.png \
	  --prompt "a S in the style of Van Gogh" --prompt "a S on the beach" --steps 25 --height 256 --width 256 \
	  -o $(DEMO)/images
	$(BIN)/elite-run --bundle $(DEMO)/bundle --image calib/concepts/7.jpg --mask calib/concepts/7_bg.png \
	  --image calib/concepts/4.png --mask calib/concepts/4_bg.png --compose --prompt "a S and a V on the beach" \
	  --lambda 0.8 --lambda 0.6 --steps 25 --height 256 --width 256 -o $(DEMO)/images
	@echo "images in $(DEMO)/images; check every graph against PyTorch with: $(BIN)/elite-export check $(DEMO)/bundle"
