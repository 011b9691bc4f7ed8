"""Blocking saves of several tools in one process, rotated, with the same state: a check on run.py's
fresh-process figures that takes the processes' differences out (docs/benchmarks.md).

    .venv/bin/python benchmarks/inprocess_saves.py raw_early_writeback,ckptstore,safetensors 8 [dir]

Prints each round (seconds / CPU seconds per tool), then medians. Tools are those of cases.save_fn.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import sys
import time

import cases
import common as c


def main() -> None:
    tools = sys.argv[1].split(",")
    runs = int(sys.argv[2])
    base = sys.argv[3] if len(sys.argv) > 3 else "bench-results"  # the disk under test, as run.py
    state = c.gpt2_state(1200, 12)
    res: dict[str, list[tuple[float, float]]] = {t: [] for t in tools}
    for r in range(runs):
        for t in tools[r % len(tools) :] + tools[: r % len(tools)]:
            out = os.path.join(base, f"inprocess-{t}")
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(out)
            fn = cases.save_fn(t, state, out)
            os.sync()
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            res[t].append((dt, r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime))
            getattr(fn, "close", lambda: None)()  # a store's background work ends before its directory goes
            shutil.rmtree(out)
        print(r, "  ".join(f"{t}={res[t][-1][0]:.2f}/{res[t][-1][1]:.2f}" for t in tools), flush=True)
    for t in tools:
        secs = statistics.median(x[0] for x in res[t])
        cpu = statistics.median(x[1] for x in res[t])
        print(f"{t:22s} median {c.nbytes(state) / secs / 1e9:.2f} GB/s  cpu {cpu:.2f} s")


if __name__ == "__main__":
    main()
