"""What retention adds to a blocking save: ``max_to_keep=1`` (each save deletes the checkpoint before it)
against no retention, in one process, rotated (docs/benchmarks.md, "Retention off the critical path").

    .venv/bin/python benchmarks/retention_overhead.py [rounds] [dir] [train_s]

Each round saves into two stores, one per policy, in rotated order; between two saves of a store the
"training" sleeps ``train_s`` seconds (0.5 by default), as a loop that saves every few steps does: the
deletion that retention starts after a commit runs in the background during it. ``os.sync()`` before each
timed save. Prints each round's save seconds, then the medians (with their spread) and the ratio.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time

import common as c

import ckptstore


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    base = sys.argv[2] if len(sys.argv) > 2 else "bench-results"
    train_s = float(sys.argv[3]) if len(sys.argv) > 3 else 0.5
    state = c.gpt2_state(768, 6)  # about 0.5 GB of float32
    policies = {"max_to_keep=1": 1, "no retention": None}
    stores = {}
    for name, keep in policies.items():
        root = os.path.join(base, f"retention-{keep}")
        shutil.rmtree(root, ignore_errors=True)
        stores[name] = ckptstore.CheckpointStore(root, max_to_keep=keep)
        stores[name].save(0, state)  # a checkpoint to delete from the first timed save on
    times: dict[str, list[float]] = {name: [] for name in policies}
    names = list(policies)
    for r in range(1, rounds + 1):
        for name in names[r % 2 :] + names[: r % 2]:
            time.sleep(train_s)  # training: the deletion started by the previous save runs meanwhile
            os.sync()
            t0 = time.perf_counter()
            stores[name].save(r, state)
            times[name].append(time.perf_counter() - t0)
        print(r, "  ".join(f"{n}={times[n][-1]:.3f}s" for n in names), flush=True)
    for store in stores.values():
        store.close()
        shutil.rmtree(store.url, ignore_errors=True)
    med = {n: statistics.median(t) for n, t in times.items()}
    for n in names:
        spread = f"(min {min(times[n]):.3f}, max {max(times[n]):.3f})"
        print(f"{n:15s} median {med[n]:.3f} s  {spread}  {c.nbytes(state) / 1e9:.2f} GB")
    print(f"ratio max_to_keep=1 / no retention: {med['max_to_keep=1'] / med['no retention']:.3f}")


if __name__ == "__main__":
    main()
