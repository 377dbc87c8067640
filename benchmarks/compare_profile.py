"""Where compare's measuring thread spends its time: compare_runs of two runs, timed by function.

The measuring thread takes each unit of tensors from the readers (`read_units`), copies what is not
on the metrics' device yet (`to_device`), measures (`tensor_metrics`, `logits_metrics`) and judges
routing (`routing_flips`). This wraps those functions of `layerwise.compare` with timers (the
measuring thread's seconds in each, and calls), runs compare_runs verified, not verified and
verified again, then with other reader counts and read-ahead sizes, and prints the largest
functions of a cProfile of one verified run (in Python 3.12 and later cProfile sees every thread).

    python benchmarks/compare_profile.py REF_RUN CAND_RUN          # e.g. a layer test's reference and isolated run
    python benchmarks/compare_profile.py --tiny                    # a CPU dry run on two small runs it writes
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from layerwise import compare, measuring, readahead  # noqa: E402
from layerwise.compare import CompareOptions, compare_runs  # noqa: E402
from layerwise.runs import open_run  # noqa: E402

TIMED = ("to_device", "tensor_metrics", "batch_tensor_metrics", "logits_metrics", "stage_unit", "judge_unit", "measure",
         "routing_flips", "check_expert_ids", "dense_weights", "align_runs", "_row")
MODULES = (compare, measuring)  # where compare_runs finds them


class Timers:
    """compare's functions wrapped with timers; `read_units` counted as the time its generator takes."""

    def __init__(self):
        self.seconds, self.calls = collections.Counter(), collections.Counter()
        self.saved = [(module, name, getattr(module, name)) for module in MODULES for name in TIMED + ("read_units",)
                      if hasattr(module, name)]
        for module, name, fn in self.saved:
            if name != "read_units":
                setattr(module, name, self._timed(name, fn))
        compare.read_units = self._reading(compare.read_units)

    def _timed(self, name, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1
        return timed

    def _reading(self, fn):
        def reading(*args, **kwargs):
            units = fn(*args, **kwargs)
            while True:
                start = time.perf_counter()
                try:
                    unit = next(units)
                except StopIteration:
                    return
                finally:
                    self.seconds["waiting for the readers"] += time.perf_counter() - start
                self.calls["units"] += 1
                self.calls["tensors"] += len(unit[2])
                self.calls["bytes"] += sum(x.numel() * x.element_size() for x in unit[2].values())
                yield unit
        return reading

    def line(self, label: str, seconds: float) -> str:
        parts = ", ".join(f"{k} {v:.2f} s ({self.calls[k]})" if self.calls[k] else f"{k} {v:.2f} s"
                          for k, v in self.seconds.most_common())
        return (f"{label}: {seconds:.2f} s, {self.calls['bytes'] / 1e9:.2f} GB, {self.calls['units']} units, "
                f"{self.calls['tensors']} tensors; {parts}")

    def restore(self):
        for module, name, fn in self.saved:
            setattr(module, name, fn)

    def clear(self):
        self.seconds.clear()
        self.calls.clear()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="REF_RUN CAND_RUN")
    parser.add_argument("--readers", default="16:1024,8:4096,4:1024", help="reader threads:MiB ahead, comma list")
    parser.add_argument("--top", type=int, default=25, help="lines of the cProfile")
    parser.add_argument("--tiny", action="store_true", help="a CPU dry run on two small runs written here")
    args = parser.parse_args(argv)
    scratch = None
    if args.tiny:
        from compare_throughput import write_runs

        scratch = tempfile.TemporaryDirectory(prefix="layerwise-profile-")
        args.runs = [str(p) for p in write_runs(Path(scratch.name), 0.004, 64, 8)[0]]
    if len(args.runs) != 2:
        parser.error("give two runs: REF_RUN CAND_RUN (or --tiny)")
    ref, cand = args.runs
    timers = Timers()
    try:
        for verify in (True, False, True):
            timers.clear()
            start = time.perf_counter()
            compare_runs(open_run(ref), open_run(cand), CompareOptions(verify=verify))
            print(timers.line(f"verify={verify}", time.perf_counter() - start), flush=True)
        saved = readahead.READ_WORKERS, readahead.WHOLE_READERS, readahead.WHOLE_READERS_CPU, readahead.READ_AHEAD_BYTES
        for spec in filter(None, args.readers.split(",")):
            workers, mib = (int(v) for v in spec.split(":"))
            readahead.READ_WORKERS = readahead.WHOLE_READERS = readahead.WHOLE_READERS_CPU = workers
            readahead.READ_AHEAD_BYTES = mib << 20
            timers.clear()
            start = time.perf_counter()
            compare_runs(open_run(ref), open_run(cand), CompareOptions(verify=True))
            print(timers.line(f"{workers} readers, {mib} MiB ahead", time.perf_counter() - start), flush=True)
        readahead.READ_WORKERS, readahead.WHOLE_READERS, readahead.WHOLE_READERS_CPU, readahead.READ_AHEAD_BYTES = saved
        profile = cProfile.Profile()
        profile.enable()
        compare_runs(open_run(ref), open_run(cand), CompareOptions(verify=True))
        profile.disable()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.top)
        print(text.getvalue())
    finally:
        timers.restore()
        if scratch is not None:
            scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
