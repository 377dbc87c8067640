"""SGLang's dumper as its releases write files, without sglang (read from its source,
`python/sglang/srt/debug_utils/dumper.py`, releases 0.4.7 to 0.5.23).

`Dumper(root, era, rank=..., tp_size=...)` is one process's dumper:
  dump(name, value, dims=None, **tags)   one file, named and filled as that release does
  set_ctx(**kv)                          context tags appended after the call's (0.5.6+)
  step()                                 end of a forward pass (0.5.10+: SGLang calls it itself;
                                         before: the user sets forward_pass_id / calls
                                         on_forward_pass_start())
Eras (the first release of each file format):
  "0.4.7"   <root>/sglang_dump_<time>_<tp rank>/forward_pass_id=F___name=N___<tags>.pt, the bare value
  "0.4.10"  <root>/sglang_dump_<time>/forward_pass_id=F___rank=R___name=N___dump_index=I___<tags>.pt
  "0.5.6"   as 0.4.10, then the context tags
  "0.5.9"   forward_pass_id, rank, dump_index, name, tags, ctx; {"value": v, "meta": {...}}
  "0.5.10"  <root>/dump_<UTC>_<ms><rand>/step=S___rank=R___dump_index=I___name=N___recompute_status=disabled
            ___<tags>___<ctx>.pt; {"value", "meta"}; step counts from 0
  "0.5.23"  as 0.5.10 with include_parallel_rank_in_filename: ...___pp_rank=0___tp_rank=R
`sglang_step(...)` writes what SGLang >= 0.5.10 dumps by itself for every forward pass (the
non-intrusive "core" fields input_ids, positions, seq_lens, req_pool_indices, rids); older eras'
users dump the same names by hand.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

ERAS = ("0.4.7", "0.4.10", "0.5.6", "0.5.9", "0.5.10", "0.5.23")
_ORDER = {era: i for i, era in enumerate(ERAS)}


def exp_dir(root: Path, era: str, tp_rank: int = 0, when: float = 1764400000.25) -> Path:
    """The directory a release writes into (all ranks share it from 0.4.10 on)."""
    if era == "0.4.7":
        return root / f"sglang_dump_{when}_{tp_rank}"
    if _ORDER[era] < _ORDER["0.5.10"]:
        return root / f"sglang_dump_{when}"
    stamp = time.strftime("%Y%m%d_%H%M%S", time.gmtime(when))
    return root / f"dump_{stamp}_{int(when * 1000) % 1000:03d}123"


class Dumper:
    def __init__(self, root: Path, era: str, rank: int = 0, tp_size: int = 1, when: float = 1764400000.25):
        self.era, self.rank, self.tp_size = era, rank, tp_size
        self.dir = exp_dir(Path(root), era, rank, when)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dump_index = 0
        self.step_count = 0 if _ORDER[era] >= _ORDER["0.5.10"] else 1  # forward_pass_id counted from 1
        self.ctx: dict = {}

    def set_ctx(self, **kv):
        assert _ORDER[self.era] >= _ORDER["0.5.6"], "set_ctx arrived in 0.5.6"
        self.ctx = {k: v for k, v in (self.ctx | kv).items() if v is not None}

    def step(self):
        self.step_count += 1

    def _parallel_info(self) -> dict:
        info = {"tp_rank": self.rank, "tp_size": self.tp_size, "pp_rank": 0, "pp_size": 1,
                "moe_ep_rank": 0, "moe_ep_size": 1, "moe_tp_rank": self.rank, "moe_tp_size": self.tp_size,
                "moe_dp_rank": 0, "moe_dp_size": 1, "attn_tp_rank": self.rank, "attn_tp_size": self.tp_size,
                "attn_dp_rank": 0, "attn_dp_size": 1, "attn_cp_rank": 0, "attn_cp_size": 1}
        if _ORDER[self.era] >= _ORDER["0.5.23"]:
            info["attn_dp_enabled"] = False
        else:
            info.update(enable_dp_attention=False, local_attn_dp_rank=0, local_attn_dp_size=1)
        return info

    def dump(self, name: str, value, dims: str | None = None, **tags):
        era = self.era
        if isinstance(value, torch.Tensor):
            value = value.detach().clone()  # the dumper clones views before saving
        if era == "0.4.7":
            kwargs = dict(forward_pass_id=self.step_count, name=name, **tags)
        else:
            self.dump_index += 1  # incremented before use: the first file has dump_index=1
            if _ORDER[era] < _ORDER["0.5.9"]:
                ctx = self.ctx if _ORDER[era] >= _ORDER["0.5.6"] else {}
                kwargs = dict(forward_pass_id=self.step_count, rank=self.rank, name=name,
                              dump_index=self.dump_index, **tags, **ctx)
            elif era == "0.5.9":
                kwargs = dict(forward_pass_id=self.step_count, rank=self.rank, dump_index=self.dump_index,
                              name=name, **tags, **self.ctx)
            else:
                kwargs = dict(step=self.step_count, rank=self.rank, dump_index=self.dump_index, name=name,
                              recompute_status="disabled", **tags, **self.ctx)
                if era == "0.5.23":
                    kwargs.update(pp_rank=0, tp_rank=self.rank)
        path = self.dir / ("___".join(f"{k}={v}" for k, v in kwargs.items()) + ".pt")
        if _ORDER[era] < _ORDER["0.5.9"]:
            torch.save(value, path)
            return path
        meta = dict(**kwargs, world_rank=self.rank, world_size=self.tp_size,
                    sglang_parallel_info=self._parallel_info())
        if _ORDER[era] >= _ORDER["0.5.10"]:
            meta["tokenizer_path"] = "/models/llama-tiny"
        if dims is not None:
            meta["dims"] = dims
        torch.save({"value": value, "meta": meta}, path)
        return path


def sglang_step(dumper: Dumper, input_ids, positions, seq_lens, rids, pool):
    """The batch fields of one forward pass, as SGLang >= 0.5.10 dumps them (DUMPER_NON_INTRUSIVE_MODE
    core) and as a user of an older release dumps them by hand."""
    dumper.dump("input_ids", torch.tensor(input_ids, dtype=torch.int64))
    dumper.dump("seq_lens", torch.tensor(seq_lens, dtype=torch.int64))
    dumper.dump("positions", torch.tensor(positions, dtype=torch.int64))
    dumper.dump("req_pool_indices", torch.tensor(pool, dtype=torch.int64))
    dumper.dump("rids", list(rids))
