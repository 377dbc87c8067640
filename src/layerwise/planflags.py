"""The flags that say where and in what a model is placed, and the `plan` command's grammar.

Every command that loads a model takes the placement flags (--device-map, --max-memory, --tokens,
--offload-folder, --no-spill) and the compute flags (--dtype, --attn-implementation, --quant);
`plan` takes them with --gpus. They live here, with the defaults and choices they show, apart
from the rest of the grammar (arguments.py), because `layerwise plan` parses its command line
before torch is imported (_fastplan.py). Standard library only.
"""

from __future__ import annotations

from .devicemap import DEFAULT_DEVICE_MAP
from .flagtypes import count
from .planning import DEFAULT_TOKENS

DEFAULT_DTYPE = "bf16"  # the compute dtype unless told (--dtype; loading.LoadOptions.dtype)
QUANT_MODES = ("dequantize", "fp8")  # --quant: how an FP8 checkpoint is held (quant.py)


def placement_flags(g, offload: bool = True) -> None:
    g.add_argument("--device-map", help="auto, balanced, balanced_low_0, sequential, cuda:N, cpu, or a JSON file "
                                        f"{{module: device}} (default: {DEFAULT_DEVICE_MAP})")
    g.add_argument("--max-memory", help='per-device limit, weights plus forward pass: "40GB" (every GPU), '
                                        '"0:60GB,1:40GB", "cpu:200GB"')
    g.add_argument("--tokens", type=count, help="forward-pass size (batch x sequence) to leave GPU room for "
                                              f"(default: {DEFAULT_TOKENS})")
    if offload:
        g.add_argument("--offload-folder", help="where weights that spill to disk go")
        g.add_argument("--no-spill", action="store_true",
                       help="refuse to load when any weight would land on cpu or disk")


def compute_flags(g, default: str | None = None, attn: bool = True) -> None:
    """--dtype, --attn-implementation, --quant; `default` names where unset ones come from."""
    g.add_argument("--dtype", help=f"compute dtype: bf16, fp16, fp32 (default: {default or DEFAULT_DTYPE})")
    if attn:
        chosen = default or "transformers' choice"
        g.add_argument("--attn-implementation", help=f"eager, sdpa or flash_attention_2 (default: {chosen})")
    quant_flag(g, default or "dequantize")


def quant_flag(g, default: str) -> None:
    g.add_argument("--quant", choices=QUANT_MODES,
                   help="FP8 checkpoints: dequantize (weights e4m3 x scale in the compute dtype, the reference) or "
                        f"fp8 (W8A8 block FP8 as vLLM/SGLang compute it) (default: {default})")


def add_plan(sub) -> None:
    """The `plan` subcommand on `sub` (argparse subparsers)."""
    p = sub.add_parser("plan", help="where the weights would go, without weights or GPUs; exit 0 fits / 1 spills")
    p.add_argument("model", help="MODEL: a checkpoint directory, a .gguf file or builtin:NAME (e.g. builtin:minimax-m2)")
    p.add_argument("--gpus", help="simulate a machine: 8x80GB or 0:80GB,1:141GB (default: the GPUs present)")
    g = p.add_argument_group("placement")
    placement_flags(g, offload=False)
    compute_flags(g, attn=False)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
