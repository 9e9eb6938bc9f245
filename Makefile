PY ?= python3
PYTEST ?= $(PY) -m pytest
# Test files run in parallel, one worker per CPU of a CI machine (2): most tests wait on real
# peers (registries, podman, redis) or on fsync, so two workers cut the wall time well below one worker's.
# `-p no:benchmark`: pytest-benchmark, when installed, warns under xdist (an error here).
TEST_JOBS ?= 2
PYTEST_PAR = $(PYTEST) -p no:benchmark -n $(TEST_JOBS) --dist loadfile

.PHONY: install demo test test-quick lint format bench soak clean

install:            ## apt peers (docker-registry, skopeo, podman) and the package with its dev tools
	./scripts/install-peers.sh
	@# The distribution was named `mirror` before `layer-mirror`: drop that old editable install,
	@# or two distributions would claim the `mirror` package and command.
	-@$(PY) -m pip uninstall -q -y mirror >/dev/null 2>&1
	$(PY) -m pip install -q -e '.[dev]'
	@touch .installed

# Installed once, again when the dependencies change: `make test` works on a fresh machine.
.installed: pyproject.toml scripts/install-peers.sh
	$(MAKE) install

demo: .installed    ## start a local registry with sample images and mirror them into ./demo/cache
	$(PY) -m tools.demo

test: .installed    ## every test, against the real peers
	$(PYTEST_PAR) -q -p no:cacheprovider

test-quick: .installed  ## the fast subset while working
	$(PYTEST_PAR) -q -p no:cacheprovider -m "not slow"

lint:
	ruff check mirror tests tools bench
	ruff format --check mirror tests tools bench
	mypy --strict mirror

format:
	ruff check --fix mirror tests tools bench
	ruff format mirror tests tools bench

bench:              ## benchmarks against skopeo; writes docs/BENCHMARKS.md
	$(PY) -m bench

soak:               ## mirror daemon for 10 minutes of short schedules: memory, fds, threads over time
	$(PY) -m bench.soak

clean:
	rm -rf demo build *.egg-info .mypy_cache .ruff_cache
