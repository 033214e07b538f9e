# fedclinic: `make demo` runs a real 3-hospital federation on this machine; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Images (docs/operators.md): `make wheelhouse` on a machine that reaches PyPI, then
# `make images` (offline when wheelhouse/ holds wheels). BuildKit is required.
DOCKER ?= docker
IMAGE_VERSION ?= 0.1.0
TORCH_VARIANT ?= cpu
WHEELHOUSE ?= wheelhouse
# a base image other than the Dockerfile's pinned python:3.11 (e.g. one made without a registry)
BASE_IMAGE ?=
# extra `docker build` flags, e.g. --network=none for a build that must not reach anything
DOCKER_BUILD_FLAGS ?=
BUILD_ARGS := $(if $(BASE_IMAGE),--build-arg PYTHON_IMAGE=$(BASE_IMAGE)) $(DOCKER_BUILD_FLAGS)

.PHONY: install demo test e2e lint clean wheelhouse images compose-test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile -e '.[dev]'
	@# pip byte-compiles one file at a time (about 40 s of a clean install on 2 cores); this
	@# does the same on every core. Files only a newer Python parses are skipped, as pip does.
	$(BIN)/python -m compileall -q -j 0 -x 'py312_intrinsics\.py$$' $(VENV)/lib >/dev/null || \
		echo "some installed files could not be byte-compiled (pip would skip them too)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedclinic local --hospitals 3 --run-config examples/demo.toml

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# `make test`: lint, type check (mypy) and everything that runs in this process or starts a few short helper
# processes (in-process federations through the real ClientApp handler included); <= 10 min on
# 2 cores. `make e2e`: the federations on real SuperLink/SuperNode processes over gRPC with TLS
# (marked `e2e`); four workers keep the 2 cores busy (a fifth made it slower, docs/testing.md).
# `.ci/run` runs both, then `make compose-test`.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -m "not e2e" -n 3 --dist load --maxschedchunk 1 --durations=15

e2e: $(STAMP)
	$(BIN)/pytest -m e2e -n 4 --dist load --maxschedchunk 1 --durations=25

# The project's pins as wheels (CPU torch where the PyTorch CPU index answers), for a Python 3.11
# on x86_64 Linux like the images'. `make images` builds from wheelhouse/ (the build context).
wheelhouse:
	$(PYTHON) docker/deps.py download --dest $(WHEELHOUSE) --torch $(TORCH_VARIANT)

# The coordinator (always CPU torch) and the hospital ($(TORCH_VARIANT) torch) images.
images:
	DOCKER_BUILDKIT=1 $(DOCKER) build -f docker/Dockerfile --target coordinator \
		-t fedclinic/coordinator:$(IMAGE_VERSION) $(BUILD_ARGS) .
	DOCKER_BUILDKIT=1 $(DOCKER) build -f docker/Dockerfile --target hospital \
		--build-arg TORCH_VARIANT=$(TORCH_VARIANT) \
		-t fedclinic/hospital:$(IMAGE_VERSION)-$(TORCH_VARIANT) $(BUILD_ARGS) .

# Both images built offline and the compose federation run on a real Docker engine (root;
# installs and starts its own engine where none runs; caches in $FEDCLINIC_CACHE).
compose-test: $(STAMP)
	.ci/compose-test

clean:
	rm -rf runs .pytest_cache .ruff_cache .mypy_cache
