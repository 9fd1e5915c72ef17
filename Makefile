# Set-up is two commands: `make demo` and `make test`. Both create .venv at the repo root.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-unit bench clean

install: $(STAMP)

# torch first (pinned, with torchvision: both lie on the build machines' disk), then DeepSpeed without build isolation so its
# setup.py sees that torch instead of pulling another torch into an isolated build env.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: install
	$(BIN)/csl demo

# Three pytest workers on 2 cores: the single-node integration tests one at a time in one
# lane (each sizes its Ray cluster for the machine), the two-node tests in another, unit
# tests beside them (tests/conftest.py).
test: install
	$(BIN)/python -m pytest -q -n 3 --dist loadgroup --durations=25

test-unit: install
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not integration"

bench: install
	$(BIN)/python bench/data_throughput.py
	$(BIN)/python bench/loss_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
