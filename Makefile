# Two entry points: `make demo` (the main job) and `make test`. Each creates .venv when it
# is missing and installs the project into it, pinned by constraints.txt.
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test install clean-venv mutants gpu-check

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip
	$(VENV)/bin/python -m pip install -c constraints.txt -e ".[test]"
	# compressed-tensors 0.14, the last release with its own sparse compressors, beside the venv (not
	# in it: it pins transformers<5) for the export cross-check in tests/test_export_legacy.py
	$(VENV)/bin/python -m pip install --no-deps --upgrade --target $(VENV)/ct014 compressed-tensors==0.14.0.1
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m mflightning.demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

clean-venv:
	rm -rf $(VENV)

# Mutation check (not part of `make test`): curated mutants of the engine, callback and mask upkeep;
# writes docs/mutants.md. About 15 minutes on 2 cores.
mutants: $(STAMP)
	$(VENV)/bin/python tools/mutants.py --jobs 2

# The GPU claims in one run (python -m mflightning.bench gpu): about 7 minutes on one H100-class GPU, writes
# outputs/bench/gpu.json and gpu.md; stops at once with the plan on a machine without CUDA.
gpu-check: $(STAMP)
	$(VENV)/bin/python -m mflightning.bench gpu
