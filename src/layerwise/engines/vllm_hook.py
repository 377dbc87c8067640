"""Write a layerwise run from inside vLLM: forward hooks a vLLM user installs with `LLM.apply_model`.

vLLM has no general tensor dumper (its `extract_hidden_states` files hold the residual stream of
chosen layers only: `layerwise import --from vllm`). These hooks record what `layerwise extract`
records, under the same names (vLLM's module paths are transformers'):

    import functools, os
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"   # apply_model ships the function to the workers
    from vllm import LLM, SamplingParams
    from layerwise.engines import vllm_hook

    llm = LLM(MODEL, enforce_eager=True, enable_prefix_caching=False)   # hooks do not run in CUDA graphs
    llm.apply_model(functools.partial(vllm_hook.install, out="runs/vllm", points="residual,attn,mlp,logits"))
    llm.generate(PROMPTS, SamplingParams(max_tokens=1, temperature=0))
    llm.apply_model(vllm_hook.finish)        # writes the manifest: the run is complete

vLLM's decoder layers take and return `(hidden_states, residual)` with the residual add fused
into the next norm: the residual stream (`model.layers.N:input` / `:output`) is their sum,
`hidden_states + residual` (added in float32, stored in the model's dtype). `self_attn` and `mlp`
outputs are the blocks' outputs, the final norm's is its first output, and the logits are
`compute_logits` of every token's normed hidden state (vLLM itself computes them for sampled
tokens only). A forward pass packs the new tokens of several requests: they are split at the
request boundaries of vLLM's attention metadata (`query_start_loc`), else where positions
restart or jump. A request starting at position 0 is a new prompt; one continuing an open prompt
is a prefill chunk, or a decode token (one token), which is skipped (`decode="skip"`) or appended.
Only tensor-parallel rank 0 writes (the recorded tensors are all-reduced, the same on every rank).
Untested inside vLLM (vLLM does not run on these machines): tests/vllm_like.py mimics vLLM's
layer conventions and drives these hooks in the test suite.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch

from ..capture import parse_points
from ..names import INPUT, OUTPUT, file_group, split_name, tensor_name
from ..recording import Recording
from ..runs import Intent, library_versions

log = logging.getLogger(__name__)

POINTS = ("embed", "residual", "output", "attn", "mlp", "norm", "logits")
_STATE = "_layerwise_recorder"


@dataclass
class _Prompt:
    index: int
    token_ids: list[int]
    next_position: int
    parts: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    decoding: bool = False


def _tp_rank() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank
        return int(get_tensor_model_parallel_rank())
    except Exception:  # not inside vLLM, or no distributed state: a single process
        return 0


def _request_starts(positions: list[int]) -> list[int]:
    """Rows where a request starts: from vLLM's attention metadata when present, else where the
    positions do not run on by one."""
    try:
        from vllm.forward_context import get_forward_context
        meta = get_forward_context().attn_metadata
        meta = next(iter(meta.values())) if isinstance(meta, dict) else meta
        starts = [int(x) for x in meta.query_start_loc.tolist()]
        return [s for s in starts[:-1] if s < len(positions)]
    except Exception:  # no vLLM or no metadata: fall back on the positions
        return [i for i, p in enumerate(positions) if i == 0 or p != positions[i - 1] + 1]


def _stream(hidden, residual) -> torch.Tensor:
    if residual is None:
        return hidden
    return (hidden.float() + residual.float()).to(hidden.dtype)


class Recorder:
    """The hooks' state: the current forward pass's tensors and the prompts still open."""

    def __init__(self, model: torch.nn.Module, out: str, points: str | None, spec: str | None,
                 decode: str, overwrite: bool):
        self.model, self.decode = model, decode
        self.points = parse_points(points or "residual,logits")
        unknown = set(self.points) - set(POINTS)
        if unknown:
            raise ValueError(f"vllm_hook records {', '.join(POINTS)}, not {', '.join(sorted(unknown))}")
        lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
        named = [nm for nm in lists if nm[0].rsplit(".", 1)[-1] == "layers"]  # not a list of experts
        self.layers_path, layers = max(named or lists, key=lambda nm: len(nm[1]))
        base = self.layers_path.rpartition(".")[0]
        self.paths = {"embed": f"{base}.embed_tokens", "norm": f"{base}.norm", "head": "lm_head"}
        self.num_layers = len(layers)
        config = getattr(model, "config", None)
        # the prompts are known only as requests arrive: finish() restates the intent with them
        self.intent = Intent(
            producer="layerwise vllm_hook",
            model={"spec": spec or getattr(config, "_name_or_path", None) or type(model).__name__,
                   "model_type": getattr(config, "model_type", None), "architecture": type(model).__name__,
                   "num_layers": self.num_layers, "hidden_size": getattr(config, "hidden_size", None)},
            settings={"engine": "vllm", "points": list(self.points), "decode": decode,
                      "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")},
            anatomy={"layers_path": self.layers_path, "embed": self.paths["embed"], "norm": self.paths["norm"],
                     "head": self.paths["head"]},
            prompts=[])
        self.recording = Recording(out, self.intent, None, overwrite)
        self.prompts: list[_Prompt] = []
        self.open: list[_Prompt] = []
        self.step: dict[str, torch.Tensor] = {}
        self.ids: list[int] = []
        self.positions: list[int] = []
        self.handles = []

    # -- hooks ---------------------------------------------------------------------------

    def install(self) -> int:
        m, want = self.model, set(self.points)
        self.handles.append(m.register_forward_pre_hook(self._start, with_kwargs=True))
        self.handles.append(m.register_forward_hook(self._end))
        if "embed" in want:
            self._on(self.paths["embed"], OUTPUT, lambda args, kwargs, out: out)
        if want & {"norm", "logits"}:
            self._on(self.paths["norm"], OUTPUT, self._norm)
        for i in range(self.num_layers):
            layer = f"{self.layers_path}.{i}"
            if "residual" in want:
                self._on(layer, INPUT, self._layer_input)
            if want & {"residual", "output"}:
                self._on(layer, OUTPUT, lambda args, kwargs, out: _stream(*out) if isinstance(out, tuple) else out)
            for point, sub in (("attn", "self_attn"), ("mlp", "mlp")):
                if point in want:
                    self._on(f"{layer}.{sub}", OUTPUT, lambda args, kwargs, out: out[0] if isinstance(out, tuple)
                             else out)
        return len(self.handles)

    def _on(self, path: str, role: str, value) -> None:
        module = self.model.get_submodule(path)
        name = tensor_name(path, role)

        def keep(args, kwargs, out):
            tensor = value(args, kwargs, out)
            if tensor is not None:
                self.step[name] = tensor.detach().to("cpu", copy=True)

        if role == INPUT:
            self.handles.append(module.register_forward_pre_hook(lambda mod, a, k: keep(a, k, None), with_kwargs=True))
        else:
            self.handles.append(module.register_forward_hook(lambda mod, a, k, o: keep(a, k, o), with_kwargs=True))

    @staticmethod
    def _layer_input(args, kwargs, out):
        hidden = kwargs.get("hidden_states", args[1] if len(args) > 1 else None)
        residual = kwargs.get("residual", args[2] if len(args) > 2 else None)
        return None if hidden is None else _stream(hidden, residual)

    def _norm(self, args, kwargs, out):
        normed = out[0] if isinstance(out, tuple) else out
        if "logits" in self.points:
            with torch.no_grad():
                try:
                    logits = self.model.compute_logits(normed)
                except TypeError:  # vLLM before 0.11: compute_logits(hidden_states, sampling_metadata)
                    logits = self.model.compute_logits(normed, None)
            if logits is not None:
                self.step[tensor_name(self.paths["head"], OUTPUT)] = logits.detach().to("cpu", copy=True)
        return normed if "norm" in self.points else None

    def _start(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        self.step = {}
        self.ids = [] if ids is None else [int(x) for x in ids.reshape(-1).tolist()]
        self.positions = [] if positions is None else [int(x) for x in positions.reshape(-1).tolist()]

    def _end(self, module, args, out):
        try:
            self._split_step()
        except Exception:  # never break the engine's forward pass; say what went wrong
            log.exception("layerwise vllm_hook: this forward pass was not recorded")

    # -- prompts ------------------------------------------------------------------------------

    def _split_step(self) -> None:
        n = len(self.ids)
        starts = _request_starts(self.positions) + [n]
        touched = set()
        for begin, end in zip(starts[:-1], starts[1:]):
            first = self.positions[begin]
            prompt = self._prompt_for(first, begin)
            if prompt is None:
                continue
            touched.add(prompt.index)
            is_decode = prompt.decoding or (first > 0 and end - begin == 1)
            prompt.next_position = first + (end - begin)
            if is_decode:
                prompt.decoding = True
                if self.decode == "skip":
                    continue
            prompt.token_ids += self.ids[begin:end]
            for name, tensor in self.step.items():
                if tensor.shape[0] == n:
                    prompt.parts.setdefault(name, []).append(tensor[begin:end])
        for prompt in [p for p in self.open if p.index not in touched]:
            self._write(prompt)
        self.step = {}

    def _prompt_for(self, first: int, row: int) -> _Prompt | None:
        if first == 0:
            prompt = _Prompt(len(self.prompts), [], 0)
            self.prompts.append(prompt)
            self.open.append(prompt)
            return prompt
        candidates = [p for p in self.open if p.next_position == first]
        if len(candidates) != 1:
            log.warning("layerwise vllm_hook: a request starting at position %d (row %d) continues %s open prompt: "
                        "not recorded (disable prefix caching; record one prompt at a time)", first, row,
                        "no" if not candidates else "more than one")
            return None
        return candidates[0]

    def _write(self, prompt: _Prompt) -> None:
        self.open.remove(prompt)
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for name, parts in prompt.parts.items():
            groups.setdefault(file_group(split_name(name)[0]), {})[name] = torch.cat(parts).contiguous()
        for group, tensors in groups.items():
            self.recording.writer.put(prompt.index, group, tensors)
        prompt.parts = {}

    def finish(self) -> dict:
        for handle in self.handles:
            handle.remove()
        with self.recording as run:  # an error here aborts the run: whole files, no manifest
            for prompt in list(self.open):
                self._write(prompt)
            prompts = [{"index": p.index, "text": None, "token_ids": p.token_ids} for p in self.prompts]
            run.writer.restate(replace(self.intent, prompts=prompts))
            manifest = run.finish({"versions": library_versions()})
        return {"run": str(run.writer.path), "prompts": len(prompts), "tensors": len(manifest["tensors"])}


def install(model: torch.nn.Module, out: str, points: str | None = None, spec: str | None = None,
            decode: str = "skip", overwrite: bool = False) -> int:
    """Install the hooks on a vLLM model (what `LLM.apply_model` passes); on TP ranks other than
    0 nothing is installed. Returns how many hooks were installed."""
    if _tp_rank() != 0:
        return 0
    if getattr(model, _STATE, None) is not None:
        raise RuntimeError("layerwise vllm_hook is already installed on this model: call finish first")
    if decode not in ("skip", "include"):
        raise ValueError(f"decode={decode!r}: choose skip or include")
    recorder = Recorder(model, out, points, spec, decode, overwrite)
    setattr(model, _STATE, recorder)
    return recorder.install()


def finish(model: torch.nn.Module) -> dict | None:
    """Write what is still open and the manifest, remove the hooks. Returns a summary (None on
    ranks that recorded nothing)."""
    recorder = getattr(model, _STATE, None)
    if recorder is None:
        return None
    setattr(model, _STATE, None)
    return recorder.finish()
