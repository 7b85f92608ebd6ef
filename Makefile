# tailord — one venv, idempotent installs. `make demo` runs the story, `make test` the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEB_PACKAGES := dataset-fashion-mnist opencv-doc gimp-data gimp-data-extras prometheus stunnel4

.PHONY: install demo test test-fast lint bench gpu-check clean data docs

install: $(STAMP) data

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Debian data packages for the built-in image sources and the Prometheus/TLS tests.
data:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

demo: install
	$(BIN)/tailord demo

# Two workers (pytest-xdist); a test file stays on one worker, so its module fixtures start once.
TEST_WORKERS ?= 2
test: install
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

test-fast: install
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow and not e2e" tests

docs: install
	$(BIN)/python -m deploy.settings --update README.md

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/stream_efficiency.py
	$(BIN)/python benchmarks/routing_latency.py

# The GPU figures (bare step, daemon with Pillow and nvJPEG, ratio, utilization, routing) in ~10 min;
# prints a skip line and exits 0 without CUDA.
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) demo-state state .pytest_cache
