# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv and build the package first. Set RECSYS_KERNELS_CUDA=0 to skip the (slow)
# CUDA extension while iterating; by default it is built whenever torch and nvcc allow it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
STAMP := $(VENV)/.recsys_kernels_built
SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.cc' -o -name '*.h' -o -name '*.cuh')

.PHONY: install demo test bench bench-smoke info clean

install: $(STAMP)

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" ninja pybind11 numpy setuptools wheel pytest pytest-benchmark hypothesis
	@# SIMDe headers (Debian's libsimde-dev): the tests run the AVX-512 / VNNI / AMX kernels on them
	@# where the CPU lacks those instructions (tests/test_*_emulated.py)
	@[ -e /usr/include/simde/x86/avx512.h ] || ! command -v apt-get > /dev/null || \
	  apt-get install -y -q libsimde-dev > /dev/null 2>&1 || \
	  (apt-get update -q > /dev/null 2>&1 && apt-get install -y -q libsimde-dev > /dev/null 2>&1) || \
	  echo "note: libsimde-dev could not be installed; the emulated AVX-512/AMX tests will skip"
	touch $@

# --no-build-isolation: the extension must compile against the torch installed in this venv (an
# isolated build would download and compile against another torch, and the import would fail).
$(STAMP): $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install --no-build-isolation -v -e . > $(VENV)/build.log 2>&1 || (tail -60 $(VENV)/build.log; exit 1)
	grep -E "^ *recsys_kernels: " $(VENV)/build.log || true
	$(PY) -c "import recsys_kernels, sys; from recsys_kernels import _loader; sys.exit(1 if '_C' not in _loader.EXTENSIONS else 0)"
	touch $@

demo: install
	$(VENV)/bin/recsys-kernels demo

test: install
	$(PY) -m pytest tests -q

bench: install
	$(PY) -m pytest bench -q --benchmark-columns=min,median,ops

bench-smoke: install
	$(PY) -m pytest bench -q -x --benchmark-disable

info: install
	$(VENV)/bin/recsys-kernels info

clean:
	rm -rf build *.egg-info recsys_kernels/*.so $(STAMP)
