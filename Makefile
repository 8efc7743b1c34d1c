# The two entry points of the README. Each sets up .venv itself (CPU torch pin in
# constraints.txt, every other package at the tested version of requirements.lock, the
# package with all its extras) and then runs its job. `make lock` refreshes the lock.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# pytest processes for the suite (pytest-xdist; a module's tests stay in one process, so its
# module-scoped fixtures are built once). Two fit this 2-core machine; more want about 3 GB each.
TEST_WORKERS ?= 2
PYTEST  = $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

.PHONY: setup demo test test-fast test-all test-browser lock clean

$(BIN)/fusioner: pyproject.toml constraints.txt requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -c requirements.lock -e ".[all]"
	touch $@

setup: $(BIN)/fusioner

demo: setup
	$(BIN)/fusioner demo

test: setup
	$(PYTEST)

# The inner loop (under 2 minutes): no full-size encoder, no extra process, no fault injection
# (docs/reliability.md's cases, `-m reliability`). `make test` runs them all.
FAST = not slow and not browser and not fullsize and not processes and not reliability
test-fast: setup
	$(PYTEST) -m "$(FAST)"

test-all: setup
	$(PYTEST) -m "slow or not slow"

# The page of `fusioner serve` in a real headless browser: Debian's chromium and chromium-driver (apt, skipped
# when both are there) and selenium (the browser extra, at the locked version), then the tests marked browser.
SUDO = $(shell [ "$$(id -u)" = 0 ] || echo sudo)
test-browser: setup
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver; }
	$(BIN)/python -m pip install --quiet -c constraints.txt -c requirements.lock -e ".[browser]"
	$(BIN)/python -m pytest -q -m browser tests/serve

# Re-resolve the tested versions after a change of pyproject.toml's ranges (pip-tools);
# torch stays pinned by constraints.txt alone, so the lock holds for CPU and CUDA builds.
lock: setup
	$(BIN)/python -m pip install --quiet -c constraints.txt pip-tools
	$(BIN)/pip-compile --quiet --strip-extras --no-emit-index-url --no-emit-find-links --unsafe-package torch \
		--extra coco --extra slurm --extra dashboard --extra minilm --extra serve --extra test --extra browser \
		--extra tensorboard --extra gpu-augment \
		-c constraints.txt -o requirements.lock pyproject.toml

clean:
	rm -rf $(VENV) demo-out
