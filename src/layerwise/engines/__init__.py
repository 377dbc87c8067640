"""Tensors from other inference engines, into layerwise runs.

- `namemap`: the name map (foreign name and tags -> `<module path>:<role>`, TOML or JSON).
- `source`: what every import source hands to `importer.import_run`.
- `sglang`: SGLang's dumper output, as its releases since 0.4.7 write it (`packing` splits its
  packed steps into prompts, `shards` un-shards tensor-parallel ranks).
- `vllm`: vLLM's `extract_hidden_states` files; `vllm_hook` writes a run from inside vLLM.
- `llamacpp`: llama.cpp itself, run through llama-cpp-python, recorded into a run.

None of them imports its engine's Python package except `llamacpp` (llama-cpp-python, an
optional extra) and `vllm_hook` (inside a vLLM worker, where vLLM is present).
"""
