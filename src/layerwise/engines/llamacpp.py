"""`layerwise extract MODEL.gguf --engine llama.cpp`: llama.cpp computes, layerwise records.

llama.cpp runs the GGUF as it would for a user (its own tokenizer, quantized weights, its CPU or
GPU kernels) through llama-cpp-python's low-level API. Its graph scheduler calls an eval callback
for every node it computes; the callback asks for the nodes below, copies their data out
(`ggml_backend_tensor_get`, host or device buffers) and stores them under the transformers
module paths of the same GGUF, so the run compares with `layerwise extract MODEL.gguf`:

| llama.cpp node        | layerwise tensor                       | point    |
| `embd` (`inp_embd`)   | `model.embed_tokens:output`            | embed    |
| `l_out-N`             | `model.layers.N:output`                | residual, output |
| `embd` / `l_out-N-1`  | `model.layers.N:input` (the same data) | residual |
| `attn_out-N`          | `model.layers.N.self_attn:output`      | attn     |
| `ffn_out-N` (else `ffn_moe_out-N`) | `model.layers.N.mlp:output` | mlp      |
| `result_norm`         | `model.norm:output`                    | norm     |
| `result_output`       | `lm_head:output`                       | logits   |

Every prompt is decoded alone, in one ubatch, with logits asked for every token (so the last
layer keeps all rows), after clearing the KV cache; llama.cpp's defaults otherwise (F16 KV
cache). Activations are F32 in llama.cpp. Names an architecture does not build (Qwen2/3 have no
`attn_out`) are reported as notes. Routers are not recorded. llama.cpp's own tools do not help
here: `llama-eval-callback` and `llama-debug` print a few values and a sum per tensor to the
console, and `llama-debug --save-logits` writes the last token's logits only.

llama-cpp-python is the `llamacpp` extra; its wheels are built from source (docs/ENGINES.md has
the flags: -DGGML_NATIVE=OFF and no AVX-512/AMX for portable CPU code).
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .. import capture, models, placement
from ..anatomy import find_anatomy
from ..errors import UserError
from ..extract import extract_intent, record
from ..names import file_group, split_name
from ..prompts import Prompt
from ..runs import library_versions

log = logging.getLogger(__name__)

INSTALL = ("llama-cpp-python is not installed: CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF "
           "-DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF\" pip install 'layerwise[llamacpp]' "
           "(it builds llama.cpp from source, several minutes; see docs/ENGINES.md)")
GGML_F32, GGML_F16, GGML_BF16 = 0, 1, 30


class GGMLTensor(ctypes.Structure):
    """struct ggml_tensor (ggml/include/ggml.h; GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64,
    GGML_MAX_SRC 10, GGML_MAX_NAME 64), the same in llama.cpp of llama-cpp-python 0.3.16-0.3.36."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


# ------------------------------------------------------------------------------ pure parts

def plan_names(anatomy, points: tuple[str, ...], layers: tuple[int, ...]) -> dict[str, list[str]]:
    """{llama.cpp node name: [layerwise tensor names it gives]} for these capture points."""
    plan: dict[str, list[str]] = {}

    def add(node: str, name: str) -> None:
        plan.setdefault(node, []).append(name)

    if "embed" in points:
        add("embd", f"{anatomy.embed_path}:output")
    for i in layers:
        layer = anatomy.layer(i)
        if "residual" in points:
            add("embd" if i == 0 else f"l_out-{i - 1}", f"{layer}:input")
        if "residual" in points or "output" in points:
            add(f"l_out-{i}", f"{layer}:output")
        if "attn" in points:
            add(f"attn_out-{i}", f"{layer}.{anatomy.attn_name or 'self_attn'}:output")
        if "mlp" in points:
            add(f"ffn_out-{i}", f"{layer}.{anatomy.mlp_name or 'mlp'}:output")
            add(f"ffn_moe_out-{i}", f"{layer}.{anatomy.mlp_name or 'mlp'}:output")
    if "norm" in points:
        add("result_norm", f"{anatomy.norm_path or 'model.norm'}:output")
    if "logits" in points:
        add("result_output", f"{anatomy.head_path}:output")
    return plan


def node_array(raw: np.ndarray, ggml_type: int, ne: list[int], nb: list[int]) -> np.ndarray:
    """A node's bytes (`ggml_nbytes` of them) as float32 [ne3, ne2, ne1, ne0] (ne0 fastest, nb the
    byte strides), leading dimensions of 1 dropped: [tokens, features] for activations."""
    if ggml_type == GGML_F32:
        typed = raw.view(np.float32)
    elif ggml_type in (GGML_F16, GGML_BF16):
        typed = raw[: raw.size - raw.size % 2].view(np.float16 if ggml_type == GGML_F16 else np.uint16)
    else:
        raise ValueError(f"ggml type {ggml_type} is not an activation type layerwise reads")
    view = np.lib.stride_tricks.as_strided(typed, shape=(ne[3], ne[2], ne[1], ne[0]),
                                           strides=(nb[3], nb[2], nb[1], nb[0]))
    out = (view.astype(np.uint32) << 16).view(np.float32) if ggml_type == GGML_BF16 else view.astype(np.float32)
    while out.ndim > 2 and out.shape[0] == 1:
        out = out[0]
    return np.ascontiguousarray(out)


def tensors_of(records: dict[str, np.ndarray], plan: dict[str, list[str]]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """One prompt's recorded nodes -> {layerwise name: tensor}, and the names no node gave.
    `ffn_out-N` wins over `ffn_moe_out-N` for the MLP's output."""
    out: dict[str, torch.Tensor] = {}
    for node in sorted(plan, key=lambda n: n.startswith("ffn_moe_out")):
        if node in records:
            for name in plan[node]:
                out.setdefault(name, torch.from_numpy(records[node]))
    wanted = {n for names in plan.values() for n in names}
    return out, sorted(wanted - set(out))


# ---------------------------------------------------------------------------------- llama.cpp

def _bindings():
    try:
        import llama_cpp
        import llama_cpp.llama_cpp as lib
    except ImportError:
        raise UserError(INSTALL) from None
    libdir = Path(llama_cpp.__file__).parent / "lib"
    found = sorted(glob.glob(str(libdir / "libggml-base.*"))) or sorted(glob.glob(str(libdir / "libggml.*")))
    if not found:
        raise UserError(f"llama-cpp-python {llama_cpp.__version__} has no libggml-base in {libdir}: reinstall it")
    ggml = ctypes.CDLL(found[0])
    for fn, res, args in (("ggml_backend_buffer_is_host", ctypes.c_bool, [ctypes.c_void_p]),
                          ("ggml_backend_tensor_get", None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                                             ctypes.c_size_t]),
                          ("ggml_nbytes", ctypes.c_size_t, [ctypes.c_void_p]),
                          ("ggml_tensor_overhead", ctypes.c_size_t, [])):
        getattr(ggml, fn).restype, getattr(ggml, fn).argtypes = res, args
    if ctypes.sizeof(GGMLTensor) != ggml.ggml_tensor_overhead() - 32:
        raise UserError(f"llama-cpp-python {llama_cpp.__version__} lays out ggml tensors differently from the "
                        "0.3.16-0.3.36 releases layerwise reads: install one of those")
    return llama_cpp, lib, ggml


class Recorder:
    """The eval callback: asks for the wanted nodes and copies each one's data when it is computed.
    The ctypes callback object must live as long as the context (it is kept here)."""

    def __init__(self, lib, ggml, wanted: set[str]):
        self.ggml, self.wanted = ggml, wanted
        self.records: dict[str, np.ndarray] = {}
        self.errors: list[str] = []
        self.callback = lib.ggml_backend_sched_eval_callback(self._callback)

    def _callback(self, pointer, ask, user_data):
        try:  # an exception must not reach ctypes: it would return False and abort the graph
            t = GGMLTensor.from_address(pointer)
            name = t.name.decode("utf-8", "replace")
            if ask:
                return name in self.wanted
            nbytes = self.ggml.ggml_nbytes(pointer)
            raw = np.empty(nbytes, dtype=np.uint8)
            if self.ggml.ggml_backend_buffer_is_host(t.buffer):
                ctypes.memmove(raw.ctypes.data, t.data, nbytes)
            else:
                self.ggml.ggml_backend_tensor_get(pointer, raw.ctypes.data, 0, nbytes)
            self.records[name] = node_array(raw, t.type, list(t.ne), list(t.nb))  # a repeated name: the last
        except Exception as err:  # noqa: BLE001 - reported after the decode
            self.errors.append(f"{type(err).__name__}: {err}")
        return True


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _quiet(level, text, user_data):
    pass


@dataclass
class Session:
    """A loaded GGUF and a context sized for the longest prompt."""

    lib: object
    model: object
    ctx: object
    vocab: object
    recorder: Recorder
    n_vocab: int
    n_ctx: int

    def tokenize(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        buf = (self.lib.llama_token * (len(data) + 16))()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, len(buf), True, False)
        if n < 0:
            buf = (self.lib.llama_token * -n)()
            n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, len(buf), True, False)
        return list(buf[:n])

    def decode(self, tokens: list[int]) -> dict[str, np.ndarray]:
        """One prompt from an empty KV cache: the recorded nodes."""
        lib = self.lib
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        batch = lib.llama_batch_init(len(tokens), 0, 1)
        try:
            batch.n_tokens = len(tokens)
            for i, token in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, 1
                batch.seq_id[i][0] = 0
            self.recorder.records, self.recorder.errors = {}, []
            code = lib.llama_decode(self.ctx, batch)
        finally:
            lib.llama_batch_free(batch)
        if code != 0 or self.recorder.errors:
            raise RuntimeError(f"llama_decode returned {code}; callback errors: {self.recorder.errors[:3]}")
        return self.recorder.records

    def close(self) -> None:
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


def open_session(path: Path, wanted: set[str], n_ctx: int, device: str, threads: int | None) -> Session:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # llama.cpp's OpenMP threads spin otherwise
    llama_cpp, lib, ggml = _bindings()
    if not log.isEnabledFor(logging.DEBUG):
        lib.llama_log_set(_quiet, ctypes.c_void_p(0))
    lib.llama_backend_init()
    mparams = lib.llama_model_default_params()
    mparams.n_gpu_layers = 0 if device == "cpu" else 999
    model = lib.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise UserError(f"llama.cpp cannot load {path} (llama-cpp-python {llama_cpp.__version__}): is it a GGUF "
                        "of an architecture this llama.cpp knows?")
    recorder = Recorder(lib, ggml, wanted)
    cparams = lib.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
    cparams.n_threads = cparams.n_threads_batch = threads or os.cpu_count() or 1
    cparams.cb_eval, cparams.cb_eval_user_data = recorder.callback, None
    ctx = lib.llama_init_from_model(model, cparams)
    if not ctx:
        lib.llama_model_free(model)
        raise UserError(f"llama.cpp cannot make a context of {n_ctx} tokens for {path}")
    vocab = lib.llama_model_get_vocab(model)
    return Session(lib, model, ctx, vocab, recorder, lib.llama_vocab_n_tokens(vocab), n_ctx)


def library_version() -> str | None:
    try:
        import importlib.metadata as md
        return md.version("llama_cpp_python")
    except Exception:  # not installed
        return None


def tokenize_all(path: Path, items: list) -> tuple[list[list[int]], int, str]:
    """Token ids of every prompt (text by llama.cpp's tokenizer, with its vocabulary's BOS rule;
    token-id prompts as given), the vocabulary size and the model's description."""
    _, lib, _ = _bindings()
    if not log.isEnabledFor(logging.DEBUG):
        lib.llama_log_set(_quiet, ctypes.c_void_p(0))
    params = lib.llama_model_default_params()
    params.vocab_only = True
    model = lib.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise UserError(f"llama.cpp cannot load {path}: is it a GGUF of an architecture this llama.cpp knows?")
    try:
        session = Session(lib, model, None, lib.llama_model_get_vocab(model), None, 0, 0)
        ids = [session.tokenize(x) if isinstance(x, str) else list(x) for x in items]
        buf = ctypes.create_string_buffer(256)
        lib.llama_model_desc(model, buf, len(buf))
        return ids, lib.llama_vocab_n_tokens(session.vocab), buf.value.decode("utf-8", "replace")
    finally:
        lib.llama_model_free(model)


def _round_up(n: int) -> int:
    return max(64, 1 << (n - 1).bit_length())


def decode_all(path: Path, token_lists: list[list[int]], plan: dict[str, list[str]], device: str,
               threads: int | None, skip=lambda index: False):
    """Yield (prompt index, {layerwise name: tensor}, missing names), one prompt at a time."""
    session = open_session(path, set(plan), _round_up(max(len(t) for t in token_lists)), device, threads)
    try:
        for i, ids in enumerate(token_lists):
            if skip(i):
                continue
            t0 = time.perf_counter()
            tensors, missing = tensors_of(session.decode(ids), plan)
            log.info("prompt %d: %d tokens in %.2f s", i, len(ids), time.perf_counter() - t0)
            yield i, tensors, missing
    finally:
        session.close()


def _checked_tokens(path: Path, items: list, max_tokens: int | None) -> tuple[list[list[int]], str]:
    token_lists, n_vocab, desc = tokenize_all(path, items)
    for i, ids in enumerate(token_lists):
        if not ids or max(ids) >= n_vocab or min(ids) < 0:
            raise UserError(f"prompt {i} has no tokens or a token id outside the vocabulary of {n_vocab}")
        if max_tokens is not None and len(ids) > max_tokens:
            raise UserError(f"prompt {i} has {len(ids)} tokens, more than --max-tokens {max_tokens}")
    return token_lists, desc


def extract_gguf(spec: str, out: str, items: list, options, device: str = "cpu", threads: int | None = None):
    """`layerwise extract MODEL.gguf --engine llama.cpp`: every prompt through llama.cpp, its
    nodes recorded into a run named as transformers names the same GGUF. Returns ExtractResult."""
    ref = models.resolve_model(spec)
    if ref.kind != "gguf":
        raise UserError(f"--engine llama.cpp runs .gguf files; {spec} is not one")
    if options.modules:
        raise UserError("--modules names transformers modules: it works with --engine transformers only")
    if device not in ("cpu", "gpu"):
        raise UserError(f"--engine llama.cpp runs on --device cpu or gpu (all layers offloaded), not {device!r}")
    _bindings()  # installed and readable, before any work
    config = models.load_config(ref).config
    meta = placement.meta_model(config, torch.float32)
    anatomy = find_anatomy(meta)
    points = capture.parse_points(options.points)
    layers = capture.parse_layers(options.layers, anatomy.num_layers)
    notes = ["routers are not recorded from llama.cpp"] if "router" in points else []
    plan = plan_names(anatomy, points, layers)
    token_lists, desc = _checked_tokens(ref.path, items, options.max_tokens)
    prompts = [Prompt(i, x if isinstance(x, str) else None, tuple(ids)) for i, (x, ids) in enumerate(zip(items, token_lists))]
    settings = {"dtype": "float32", "engine": "llama.cpp", "device": device, "weights": desc,
                "llama_cpp_python": library_version(), "kv_cache": "f16", "attn_implementation": None,
                "device_map": None, "quant": None}
    intent = replace(extract_intent(ref, config, type(meta).__name__, anatomy, prompts, points, layers, options,
                                    settings), producer="layerwise extract --engine llama.cpp")
    groups = {file_group(split_name(n)[0]) for names in plan.values() for n in names}
    with record(out, intent, None, options) as run:
        done = [i for i in range(len(prompts)) if all(run.writer.has(i, g) for g in groups)]
        absent: set[str] = set()
        for index, tensors, missing in decode_all(ref.path, token_lists, plan, device, threads,
                                                  skip=lambda i: i in done):
            absent.update(missing)
            by_group: dict[str, dict[str, torch.Tensor]] = {}
            for name, tensor in tensors.items():
                by_group.setdefault(file_group(split_name(name)[0]), {})[name] = tensor
            for group, members in by_group.items():
                run.writer.put(index, group, members)
        if absent:
            notes.append(f"not built by this architecture in llama.cpp: {', '.join(sorted(absent)[:6])}"
                         f"{' ...' if len(absent) > 6 else ''}")
        seconds = run.close_capture()
        run.finish({"versions": library_versions(), "notes": notes,
                    "stats": {"seconds": seconds, "bytes": run.writer.bytes_written}})
    return replace(run.result(len(prompts), seconds, resumed_batches=len(done)), notes=tuple(notes))
