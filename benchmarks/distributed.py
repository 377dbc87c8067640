"""Scale-out under torchrun on one node: data-parallel extract and layer tests against one
process, and the tensor-parallel candidate against the one-process (device_map) reference.

A MiniMax-M2-shaped checkpoint (real dimensions, --layers layers of 256 experts, seeded random
bf16 weights, fp32 router) is written once to --dir, and --prompts prompts of --tokens random
token ids. Everything then runs through the real command line: `layerwise ...` for one process
(on GPU 0 alone), `torchrun --standalone --nproc-per-node N -m layerwise ...` for N ranks:

  extract  one process vs N ranks, each a whole replica computing its share of the batches: the
           seconds of the recording (after loading: manifest stats, the slowest rank), the
           speed-up (goal >= 0.95 N), and whether the runs are bit-identical (every tensor's sha256)
  test     `test --test-type single --layer all` against the one-process run: one process vs N
           ranks (each its chunk of layers, the chain pipelined): the seconds of the replay
           (manifest stats, the slowest rank), the speed-up, both runs bit-identical; and each
           command's process wall time: before the replay (start-up), after it (the compare of the
           runs with the reference, the report, the exit) and the compare's own seconds
  read     every layer's weights from the page cache onto GPU 0 with 1, 4 and 8 reading
           threads (what the layer test reads): GB/s
  write    the one-process extract's bytes written to the page cache by 1 process, then by N side
           by side (layerwise's file writer and digests): GB/s, the floor of the data-parallel
           extract on this machine
  tp       `extract --tp` over the N ranks (transformers' tp_plan="auto") against the one-process
           run: per layer the attention output's rel_l2, the MoE output's rel_l2 and the routing
           flips (`layerwise compare --json`)

--read-threads 8,16 runs the test part once per value, with LAYERWISE_READ_THREADS set to it on
every process (parts "test@8", "test@16"), taking turns in each round.
--repeat N measures extract and test N times, each round against a one-process run made just
before it, and shows the spread of the speed-up. Prints one table; JSON to --out/distributed.json, rewritten after every part (a session cut short
keeps what it measured). A part that fails is recorded with its error and the others still run.
Runs are deleted once measured (--keep to keep them); the checkpoint stays for a rerun.
Dry run on a CPU: --tiny (gloo, tiny dimensions, the same commands; OMP_NUM_THREADS=1 on every
process, so one process and the ranks compute with the same kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import build_on_devices, layerwise_env, minimax_config, write_checkpoint  # noqa: E402

from layerwise import runs  # noqa: E402

POINTS = "residual,attn,mlp,router"  # no logits: 0.4 MB per token of MiniMax-M2
GOAL = 0.95  # of N: the speed-up goal on N ranks (1.9x on 2)


class Failure(Exception):
    """A command failed: its line and the end of its stderr."""


class Bench:
    def __init__(self, args):
        self.args = args
        self.work, self.ckpt = Path(args.work), Path(args.dir)
        self.ranks = args.ranks
        self.gpu = torch.cuda.is_available() and not args.tiny
        self.env = layerwise_env(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")

    # ---------------------------------------------------------------------------- running
    def layerwise(self, ranks: int, *argv, ok=(0,)) -> float:
        """`layerwise ARGV` on one process (GPU 0 only) or N ranks; returns the wall seconds."""
        argv = [str(a) for a in argv]
        if ranks == 1:
            cmd, env = [sys.executable, "-m", "layerwise", *argv], {**self.env, "CUDA_VISIBLE_DEVICES": "0"}
            if not self.gpu:
                env.pop("CUDA_VISIBLE_DEVICES")
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                   "-m", "layerwise", *argv]
            env = self.env
        print(f"$ {'torchrun x%d ' % ranks if ranks > 1 else ''}layerwise {' '.join(argv)}", flush=True)
        self.launched = time.time()  # each process's start-up stages are told from here (`startup`)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=self.args.command_timeout)
        wall = time.perf_counter() - t0
        if done.returncode not in ok:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
            raise Failure(f"layerwise {argv[0]} on {ranks} rank(s) exited {done.returncode} after {wall:.0f} s:\n{tail}")
        print(f"  {wall:.1f} s", flush=True)
        return wall

    def extract(self, ranks: int, out: Path, *extra) -> float:
        return self.layerwise(ranks, "extract", self.ckpt, "--out", out, "--prompts", self.work / "prompts.jsonl",
                              "--points", POINTS, "--batch-size", self.args.batch_size, "--dtype", "bf16",
                              "--overwrite", "--dist-timeout", self.args.dist_timeout, *extra)

    def drop(self, *paths: Path) -> None:
        if not self.args.keep:
            for p in paths:
                shutil.rmtree(p, ignore_errors=True)

    # ---------------------------------------------------------------------------- set-up
    def setup(self) -> dict:
        """The checkpoint (written once) and the prompts; what they are."""
        self.work.mkdir(parents=True, exist_ok=True)
        config = minimax_config(self.args.layers, tiny=self.args.tiny)
        if not (self.ckpt / "config.json").exists():
            t0 = time.perf_counter()
            model = build_on_devices(config, {"": "cuda:0" if self.gpu else "cpu"}, torch.bfloat16)
            write_checkpoint(model, self.ckpt, shard="4GB")
            del model
            if self.gpu:
                torch.cuda.empty_cache()
            print(f"wrote {self.ckpt} in {time.perf_counter() - t0:.0f} s", flush=True)
        generator = torch.Generator().manual_seed(0)
        with open(self.work / "prompts.jsonl", "w") as fh:
            for _ in range(self.args.prompts):
                ids = torch.randint(0, config.vocab_size, (self.args.tokens,), generator=generator).tolist()
                fh.write(json.dumps({"token_ids": ids}) + "\n")
        gb = sum(f.stat().st_size for f in self.ckpt.glob("*.safetensors")) / 1e9
        card = torch.cuda.get_device_name(0) if self.gpu else platform.processor() or "cpu"
        return {"layers": self.args.layers, "experts": config.num_local_experts, "hidden": config.hidden_size,
                "checkpoint_gb": gb, "prompts": self.args.prompts, "tokens": self.args.tokens,
                "batch_size": self.args.batch_size, "ranks": self.ranks, "card": card,
                "gpus": torch.cuda.device_count() if self.gpu else 0, "versions": runs.library_versions()}

    def reference(self) -> dict:
        """The one-process extract: the 1-rank time and every other part's reference."""
        wall = self.extract(1, self.work / "one")
        stats = manifest(self.work / "one")["stats"]
        return {"wall_s": wall, "seconds": stats["seconds"], "stats": stats, "startup": startup([stats], self.launched)}

    # ---------------------------------------------------------------------------- parts
    def part_extract(self, one: dict) -> dict:
        wall = self.extract(self.ranks, self.work / "dp")
        ranks = manifest(self.work / "dp")["stats"]["ranks"]
        began = startup(ranks, self.launched)
        seconds = max(r["seconds"] for r in ranks)
        same = equal_runs(self.work / "one", self.work / "dp")
        self.drop(self.work / "dp")
        return {"one_s": one["seconds"], "ranks_s": seconds, "speedup": one["seconds"] / seconds,
                "one_wall_s": one["wall_s"], "ranks_wall_s": wall, "one_stats": one["stats"], "per_rank": ranks,
                "startup": {"one": one.get("startup", []), "ranks": began}, **same}

    def part_test(self, one: dict, threads: str = "") -> dict:
        out = {}
        saved = self.env
        if threads:
            self.env = {**self.env, "LAYERWISE_READ_THREADS": threads}
        try:
            return self._test(out)
        finally:
            self.env = saved

    def _test(self, out: dict) -> dict:
        for n, name in ((1, "test1"), (self.ranks, "testN")):
            started = time.time()
            wall = self.layerwise(n, "test", self.ckpt, "--reference", self.work / "one", "--test-type", "single",
                                  "--layer", "all", "--out", self.work / name, "--overwrite",
                                  "--json", self.work / f"{name}.json", "--dist-timeout", self.args.dist_timeout,
                                  ok=(0, 1))
            isolated = manifest(self.work / name / "isolated")
            stats = isolated["stats"]
            seconds = max(r["seconds"] for r in stats["ranks"]) if "ranks" in stats else stats["seconds"]
            kept = ("rank", "seconds", "timeline", "timeline_origin_unix")  # and every phase's *_seconds
            reports = json.loads((self.work / f"{name}.json").read_text())["reports"].values()
            origins = [r["timeline_origin_unix"] for r in stats.get("ranks", [stats])]
            out[name] = {"seconds": seconds, "wall_s": wall, "load_s": stats.get("load_seconds"),
                         "before_s": min(origins) - started,  # start-up: imports, CUDA, opening the runs
                         "compare_s": sum(r["stats"]["seconds"] for r in reports),  # after the replay
                         "after_s": started + wall - max(origins) - seconds,  # the compare, the report, the exit
                         "determinism": isolated.get("determinism"),
                         "startup": startup(stats.get("ranks", [stats]), self.launched),
                         "phases": [{k: v for k, v in r.items() if k in kept or k.endswith("_seconds")}
                                    for r in stats.get("ranks", [stats])]}
        same = {kind: equal_runs(self.work / "test1" / kind, self.work / "testN" / kind) for kind in ("isolated", "chained")}
        reports = [same_report(self.work / f"{name}.json") for name in ("test1", "testN")]
        self.drop(self.work / "test1", self.work / "testN")
        return {"one_s": out["test1"]["seconds"], "ranks_s": out["testN"]["seconds"],
                "speedup": out["test1"]["seconds"] / out["testN"]["seconds"], "runs": out, "equal": same,
                "reports_equal": reports[0] == reports[1],
                "bit_identical": all(s["bit_identical"] for s in same.values())}

    def part_read(self, one: dict) -> dict:
        """Every layer's weights from the page cache onto GPU 0 (the layer test's reads), with
        1, 4 and 8 reading threads: GB/s."""
        from layerwise import checkpoint, tensorfile

        device = "cuda:0" if self.gpu else "cpu"
        wmap = checkpoint.weight_map(self.ckpt)
        layers = [[n for n in wmap if n.startswith(f"model.layers.{i}.")] for i in range(self.args.layers)]
        before, best = tensorfile.READ_THREADS, {}
        try:
            for threads in (1, 4, 8):
                tensorfile.READ_THREADS = threads
                t0, size = time.perf_counter(), 0
                for names in layers:
                    got = checkpoint.read_tensors(self.ckpt, names, device, wmap=wmap)
                    size += sum(t.numel() * t.element_size() for t in got.values())
                    del got
                best[threads] = gbps = size / (time.perf_counter() - t0) / 1e9
                print(f"  read {size / 1e9:.1f} GB with {threads} thread(s): {gbps:.2f} GB/s", flush=True)
        finally:
            tensorfile.READ_THREADS = before
        return {"gb": size / 1e9, "gbps_by_threads": best, "default_threads": before}

    def part_write(self, one: dict) -> dict:
        """The extract's bytes written to the page cache by 1 process, then by N side by side (each
        its share, in files of the extract's size, through layerwise's writer and digests): GB/s
        of all together, the floor of a data-parallel extract on this machine."""
        total, size = one["stats"]["bytes"], one["stats"]["bytes"] // (self.args.prompts * self.args.layers)
        out = {"gb": total / 1e9, "file_mb": size / 1e6}
        for procs in (1, self.ranks):
            start = time.time() + (4 if self.args.tiny else 15)  # every process has imported torch by then
            spans = []
            workers = [subprocess.Popen([sys.executable, __file__, "--write-worker",
                                         f"{total // procs},{size},{self.work / f'write{p}'},{start}"],
                                        env=self.env, stdout=subprocess.PIPE, text=True) for p in range(procs)]
            for w in workers:
                spans.append(json.loads(w.communicate(timeout=self.args.command_timeout)[0].strip().splitlines()[-1]))
            seconds = max(s["end"] for s in spans) - min(s["start"] for s in spans)
            out[f"gbps_{procs}"] = sum(s["bytes"] for s in spans) / seconds / 1e9
            for p in range(procs):
                shutil.rmtree(self.work / f"write{p}", ignore_errors=True)
            print(f"  written by {procs} process(es): {out[f'gbps_{procs}']:.2f} GB/s", flush=True)
        return out

    def part_tp(self, one: dict) -> dict:
        wall = self.extract(self.ranks, self.work / "tp", "--tp")
        self.layerwise(1, "compare", self.work / "one", self.work / "tp", "--json", self.work / "tp.json", ok=(0, 1))
        report = json.loads((self.work / "tp.json").read_text())
        seconds = manifest(self.work / "tp")["stats"]["seconds"]
        self.drop(self.work / "tp")
        return {"wall_s": wall, "seconds": seconds, "layers": tp_rows(report),
                "logits": {k: v for k, v in (report.get("logits") or {}).items() if k != "per_prompt"}}


REPEATED = ("extract", "test")  # the parts --repeat measures again (tp's numerics do not vary)


def write_worker(spec: str) -> None:
    """One process of the write part: BYTES in files of SIZE into DIR from unix time START, on
    the writer's thread count; prints its start, end and bytes as JSON."""
    from concurrent.futures import ThreadPoolExecutor

    from layerwise import tensorfile

    total, size, where, start = spec.split(",")
    data, where = torch.randint(0, 256, (int(size),), dtype=torch.uint8), Path(where)
    where.mkdir(parents=True, exist_ok=True)

    def write(i: int) -> None:
        tmp = where / f".{i}.tmp"
        tensorfile.write_file(tmp, {"x": data}, {})
        os.replace(tmp, where / f"{i}.safetensors")

    time.sleep(max(0.0, float(start) - time.time()))
    t0, files = time.time(), max(1, int(total) // int(size))
    with ThreadPoolExecutor(runs.writer_threads()) as pool:
        list(pool.map(write, range(files)))
    print(json.dumps({"start": t0, "end": time.time(), "bytes": files * int(size)}), flush=True)


def expand(parts: str, read_threads: str) -> list[str]:
    """The parts in order, "test" once per --read-threads value ("test@8")."""
    out = []
    for part in filter(None, parts.split(",")):
        values = [t.strip() for t in read_threads.split(",") if t.strip()] if part == "test" else []
        out += [f"test@{t}" for t in values] if values else [part]
    return out


def summary(rounds: list[dict]) -> dict:
    """A part over its rounds: the round of median speed-up, with every round and the spread
    (min / median / max) of the speed-up; the first error if any round failed."""
    failed = [r for r in rounds if "error" in r]
    if failed:
        return {**failed[0], "rounds": rounds}
    if "speedup" not in rounds[0]:
        return rounds[0]
    ups = sorted(r["speedup"] for r in rounds)
    median = sorted(rounds, key=lambda r: r["speedup"])[(len(rounds) - 1) // 2]
    if "reports_equal" in median:
        median = {**median, "reports_equal": all(r["reports_equal"] for r in rounds)}
    return {**median, "rounds": rounds, "bit_identical": all(r["bit_identical"] for r in rounds),
            "speedup_spread": {"min": ups[0], "median": median["speedup"], "max": ups[-1]}}


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def equal_runs(a: Path, b: Path) -> dict:
    """Bit for bit, from the manifests' digest of every tensor."""
    x = {(e.name, e.prompt): e.digests for e in runs.open_run(a).entries()}
    y = {(e.name, e.prompt): e.digests for e in runs.open_run(b).entries()}
    differ = sorted(k for k in x if y.get(k) != x[k])
    return {"tensors": len(x), "bit_identical": x == y, "differ": len(differ) + len(set(y) - set(x)),
            "first_differing": list(differ[0]) if differ else None}


def startup(stats: list[dict], launched: float) -> list[dict]:
    """Each process's start-up (its manifest stats' `startup`), in seconds since the command was
    launched: when the process began, each stage it reached and, for a layer test, its replay."""
    out = []
    for s in stats:
        began = (s.get("startup") or {}).get("process_start_unix")
        if began is None:
            continue
        stages = [["began", 0.0], *s["startup"]["stages"]]
        if "timeline_origin_unix" in s:
            stages.append(["replay", s["timeline_origin_unix"] - began])
        out.append({"rank": s.get("rank") or 0, "stages": [[name, round(began - launched + at, 3)] for name, at in stages]})
    return out


def startup_lines(label: str, processes: list[dict]) -> list[str]:
    return [f"{'':28} {label} rank {p['rank']} start-up, s after launch: "
            + ", ".join(f"{name} {at:.2f}" for name, at in p["stages"]) for p in processes]


def same_report(path: Path) -> dict:
    """A layer test's --json without the runs' paths and the compare's timings."""
    data = json.loads(path.read_text())
    for report in data["reports"].values():
        for key in ("stats", "reference", "candidate"):
            report.pop(key, None)
    for key in ("reference", "runs"):
        data.pop(key, None)
    return data


def tp_rows(report: dict) -> list[dict]:
    """Per layer: the attention and MoE outputs' rel_l2 and the routing flips, from a compare report."""
    rows: dict[int, dict] = {}
    for r in report["rows"]:
        if r["layer"] is None or r["role"] != "output":
            continue
        part = r["module"].rsplit(".", 1)[-1]
        key = "attn_rel_l2" if "attn" in part else "moe_rel_l2" if part in ("mlp", "block_sparse_moe", "moe") else None
        if key:
            rows.setdefault(r["layer"], {"layer": r["layer"]})[key] = r["rel_l2"]
    for r in report["routing"]:
        rows.setdefault(r["layer"], {"layer": r["layer"]}).update(flips=r["flips"], tokens=r["tokens"],
                                                                  same_set=r["same_set"])
    return [rows[k] for k in sorted(rows)]


def table(results: dict) -> str:
    s = results["setup"]
    head = (f"distributed: {s['layers']} MiniMax-M2 layers ({s['experts']} experts, {s['checkpoint_gb']:.1f} GB bf16), "
            f"{s['prompts']} prompts x {s['tokens']} tokens, batch {s['batch_size']}, {s['ranks']} ranks; {s['card']}")
    lines = [head, "", f"{'':28} {'1 rank':>9} {str(s['ranks']) + ' ranks':>9} {'speed-up':>9} {'goal':>6}  equal"]
    goal = GOAL * s["ranks"]
    named = [("extract", "extract (record s)")] + [
        (name, "test --layer all (replay s)" + (f", {name.partition('@')[2]} read threads" if "@" in name else ""))
        for name in results["parts"] if name.partition("@")[0] == "test"]
    width = max(28, *(len(label) for _, label in named))
    lines[-1] = f"{'':{width}}" + lines[-1][28:]
    for name, label in named:
        p = results["parts"].get(name)
        if p is None:
            continue
        if "error" in p:
            lines.append(f"{label:{width}} FAILED: {p['error'].splitlines()[0]}")
            continue
        equal = ("bit-identical" if p["bit_identical"] else "DIFFER") + \
            {True: ", same report", False: ", REPORTS DIFFER", None: ""}[p.get("reports_equal")]
        lines.append(f"{label:{width}} {p['one_s']:9.2f} {p['ranks_s']:9.2f} {p['speedup']:8.2f}x {goal:5.2f}x  {equal}"
                     + ("" if p["speedup"] >= goal else "  (below goal)"))
        if len(p.get("rounds", [])) > 1:
            each = " / ".join(f"{r['one_s']:.2f} vs {r['ranks_s']:.2f} s" for r in p["rounds"])
            spread = p["speedup_spread"]
            lines.append(f"{'':28} {len(p['rounds'])} rounds: {each}; speed-up min / median / max "
                         f"{spread['min']:.2f}x / {spread['median']:.2f}x / {spread['max']:.2f}x")
        if name.startswith("test"):
            one, many = p["runs"]["test1"], p["runs"]["testN"]
            lines.append(f"{'':28} process wall {one['wall_s']:.2f} vs {many['wall_s']:.2f} s "
                         f"({one['wall_s'] / many['wall_s']:.2f}x): before the replay {one['before_s']:.2f} / "
                         f"{many['before_s']:.2f} s, after it {one['after_s']:.2f} / {many['after_s']:.2f} s, "
                         f"of which comparing {one['compare_s']:.2f} / {many['compare_s']:.2f} s")
            lines += phase_lines(p)
            lines += startup_lines("test1", one.get("startup", [])) + startup_lines("testN", many.get("startup", []))
        elif "startup" in p:
            lines += startup_lines("extract 1", p["startup"]["one"]) + startup_lines("extract N", p["startup"]["ranks"])
    write = results["parts"].get("write")
    if write is not None and "error" not in write:
        both = write["gbps_%d" % s["ranks"]]
        lines += ["", f"the extract's {write['gb']:.1f} GB to the page cache ({write['file_mb']:.0f} MB files), GB/s: "
                  f"1 process {write['gbps_1']:.2f}, {s['ranks']} side by side {both:.2f}"]
    read = results["parts"].get("read")
    if read is not None and "error" not in read:
        speeds = ", ".join(f"{n} thread(s) {v:.2f}" for n, v in read["gbps_by_threads"].items())
        lines += ["", f"layer weights from the page cache to one GPU ({read['gb']:.1f} GB), GB/s: {speeds} "
                  f"(default {read['default_threads']})"]
    tp = results["parts"].get("tp")
    if tp is not None:
        lines += ["", f"TP={s['ranks']} candidate vs the one-process (device_map) reference:"]
        if "error" in tp:
            lines.append(f"  FAILED: {tp['error'].splitlines()[0]}")
        else:
            lines.append(f"{'layer':>6} {'attn rel_l2':>12} {'MoE rel_l2':>11} {'routing flips':>14}")
            for r in tp["layers"]:
                lines.append(f"{r['layer']:>6} {_sci(r.get('attn_rel_l2')):>12} {_sci(r.get('moe_rel_l2')):>11} "
                             f"{r.get('flips', '-')!s:>6} / {r.get('tokens', '-')!s:<7}")
    return "\n".join(lines)


def phase_lines(part: dict) -> list[str]:
    """The median round's layer tests, per process: seconds per phase and, on ranks, when the
    first chained outputs were out (from the manifests' timelines)."""
    lines = []
    for name in ("test1", "testN"):
        for r in part["runs"][name].get("phases", []):
            chain = [end for phase, _, _, end in r.get("timeline", []) if phase == "chain"]
            spent = ", ".join(f"{k.removesuffix('_seconds')} {v:.2f}" for k, v in sorted(r.items())
                              if k.endswith("_seconds"))
            first = f"; first chain out at {min(chain):.2f} s" if chain else ""
            lines.append(f"{'':28} {name} rank {r.get('rank') or 0}: {spent}{first}")
    return lines


def _sci(x) -> str:
    return "-" if x is None else f"{x:.2e}"


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--write-worker"]:
        write_worker(sys.argv[2])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--ranks", type=int, default=max(2, torch.cuda.device_count()))
    ap.add_argument("--parts", default="extract,test,tp", help="which parts, comma list of extract,test,tp,read,write")
    ap.add_argument("--dir", default="/tmp/lw-dist-ckpt", help="the synthetic checkpoint (kept for a rerun)")
    ap.add_argument("--work", default="/tmp/lw-dist-work", help="prompts and runs (GBs; not $OUT)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--dist-timeout", type=float, default=900)
    ap.add_argument("--command-timeout", type=float, default=1800, help="seconds one command may take")
    ap.add_argument("--keep", action="store_true", help="keep the runs (else deleted once measured)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of extract and test, each with its own "
                    "one-process run (the table shows the spread)")
    ap.add_argument("--read-threads", default="", help="comma list: the test part once per value of "
                    "LAYERWISE_READ_THREADS (default: the processes' own)")
    ap.add_argument("--tiny", action="store_true", help="tiny dimensions on the CPU: a dry run")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    results: dict = {"parts": {}}

    def save() -> None:
        (out / "distributed.json").write_text(json.dumps(results, indent=1, default=str))

    results["setup"] = bench.setup()
    save()
    try:
        one = results["reference"] = bench.reference()
    except Failure as err:
        print(err, flush=True)
        results["reference"] = {"error": str(err)}
        save()
        return 1
    rounds: dict[str, list] = {}
    for number in range(args.repeat):
        if number:  # every round against its own one-process run, measured just before it
            bench.drop(bench.work / "one")
            try:
                one = bench.reference()
            except Failure as err:
                print(err, flush=True)
                break
        for part in expand(args.parts, args.read_threads):
            base, _, threads = part.partition("@")
            if number and base not in REPEATED:
                continue
            try:
                got = getattr(bench, f"part_{base}")(one, threads) if threads else getattr(bench, f"part_{base}")(one)
                rounds.setdefault(part, []).append(got)
            except (Failure, OSError, KeyError, ValueError) as err:
                print(f"{part}: {err}", flush=True)
                rounds.setdefault(part, []).append({"error": f"{type(err).__name__}: {err}"})
            results["parts"][part] = summary(rounds[part])
            save()
    bench.drop(bench.work / "one")
    text = table(results)
    print(text, flush=True)
    (out / "distributed.md").write_text(text + "\n")
    return 1 if any("error" in p for p in results["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
