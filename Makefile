# `make demo` and `make test` set up whatever is missing (the .venv, the fixtures)
# and then run; nothing outside this folder is needed but the package registry.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
RENDERQA := $(VENV)/bin/renderqa
INSTALLED := $(VENV)/.installed
FIXTURES := fixtures/build/.built
DEMO_OUT := demo-out

.PHONY: all venv fixtures test lint demo bench clean
.PHONY: demo-render demo-sweep demo-studio

all: test

venv: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

fixtures: $(FIXTURES)

$(FIXTURES): $(INSTALLED) $(wildcard fixtures/*.py)
	$(PY) -m fixtures.build --out fixtures/build
	touch $@

lint: $(INSTALLED)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test: lint $(FIXTURES)
	$(VENV)/bin/pytest

# The main job runs on the trained miniature studio models (committed weights in
# fixtures/trained/, no download): a render, then the guidance trade-off sweep.
demo: demo-render demo-studio

demo-render: $(INSTALLED)
	HF_HUB_OFFLINE=1 $(RENDERQA) render "a red mug on a white background" \
		--model fixtures/trained/studio-sdxl --seeds 0-3 --steps 20 \
		--width 64 --height 64 --guidance-scale 9 --guidance-rescale 0.7 \
		--out $(DEMO_OUT)/render

# A small sweep on the random-weight fixtures: it exercises the code, not the effect.
demo-sweep: $(FIXTURES)
	HF_HUB_OFFLINE=1 $(RENDERQA) sweep-rescale \
		--model fixtures/build/tiny-sdxl-eps \
		--prompt "a red mug on a white background" --prompt "a blue glass vase" \
		--seeds 0-1 --guidance-scale 5,9 --guidance-rescale 0,0.7,1.0 \
		--steps 4 --width 64 --height 64 --batch-size 6 \
		--clip-model fixtures/build/tiny-clip/tiny-clip.json \
		--clip-pretrained fixtures/build/tiny-clip/tiny-clip.safetensors \
		--out $(DEMO_OUT)/sweep

# The trade-off on the trained miniature studio pipeline: guidance 3 and 9, rescale
# 0 to 1, with and without latent thresholding.
demo-studio: $(INSTALLED)
	HF_HUB_OFFLINE=1 $(RENDERQA) sweep-rescale \
		--model fixtures/trained/studio-sdxl \
		--prompt "a red mug on a white background" \
		--prompt "an orange ball on a white background" \
		--prompt "a green vase on a white background" \
		--prompt "a pink ball on a white background" \
		--seeds 0-3 --guidance-scale 3,9 --guidance-rescale 0,0.25,0.5,0.7,1.0 \
		--threshold off,latent:0.995:3 --steps 20 --width 64 --height 64 \
		--batch-size 10 --clip-model local-dir:fixtures/trained/studio-clip \
		--tolerance 2 --out $(DEMO_OUT)/studio

bench: $(FIXTURES)
	@for script in tests/benchmarks/bench_*.py; do \
		echo "== $$script"; $(PY) $$script || exit 1; \
	done

clean:
	rm -rf fixtures/build $(DEMO_OUT)
