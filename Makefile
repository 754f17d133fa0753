# Two commands: `make demo` and `make test`. Both set up .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# `make demo` needs only the train extra: a smaller first set-up than the dev extras of `make test`
DEMO_STAMP := $(VENV)/.installed-train
TORCH   := torch==2.14.1 torchvision==0.29.1

.PHONY: setup test test-fast demo bench docs wheel clean

setup: $(STAMP)

# torch and torchvision are pinned and installed first (they lie on this machine's disk);
# the package then installs against them and never resolves an unpinned torch.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]" $(TORCH)
	touch $(STAMP) $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[train]" $(TORCH)
	touch $(DEMO_STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest

test-fast: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -m "not slow"

demo: $(DEMO_STAMP)
	$(BIN)/mammut demo

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py

# the documentation site (mkdocs.yml, docs/) into site/; --strict: a warning (a broken link or
# anchor, a page outside the nav, a docstring mkdocstrings cannot read) fails the build
docs: $(STAMP)
	$(BIN)/mkdocs build --strict -q -d site

# dist/mammut_vl-<version>-py3-none-any.whl, offline (setuptools comes with the dev extra);
# install it elsewhere with torch first: pip install torch && pip install "dist/mammut_vl-...whl[train]"
wheel: $(STAMP)
	$(BIN)/pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation --no-index -w dist .

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info
