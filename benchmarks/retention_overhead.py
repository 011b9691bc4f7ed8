"""What retention adds to a blocking save: ``max_to_keep=1`` (each save deletes the checkpoint before it), its
pass in the background (the default) and in the save, against no retention, in one process, rotated
(docs/benchmarks.md, "Retention off the critical path").

    .venv/bin/python benchmarks/retention_overhead.py [rounds] [dir] [train_s]

Each round saves into three stores, one per variant, in rotated order; before each save the "training"
sleeps ``train_s`` seconds (0.5 by default), as a loop that saves every few steps does: the deletion that
retention starts after a commit runs in the background during it. The store without retention has its old
checkpoint removed during that sleep too (outside the timing), so that every variant writes onto a disk in
the same state. ``os.sync()`` before each timed save. Prints each round's save seconds, then the medians
(with their spread) and the ratios: of the medians, and the median of each round's pair. Given a directory
on tmpfs (``/dev/shm``), it measures what retention costs the process without the disk's noise.
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
    state = c.gpt2_state(768, 6)  # about 0.33 GB of float32
    variants = {"no retention": (None, True), "background": (1, True), "in the save": (1, False)}
    stores = {}
    for name, (keep, _) in variants.items():
        root = os.path.join(base, f"retention-{name.replace(' ', '-')}")
        shutil.rmtree(root, ignore_errors=True)
        stores[name] = ckptstore.CheckpointStore(root, max_to_keep=keep)
        stores[name].save(0, state)  # a checkpoint to delete from the first timed save on
    times: dict[str, list[float]] = {name: [] for name in variants}
    spent: dict[str, list[float]] = {name: [] for name in variants}  # retention_wait + retention, in the save
    names = list(variants)
    for r in range(1, rounds + 1):
        for name in names[r % 3 :] + names[: r % 3]:
            store = stores[name]
            if name == "no retention":  # the old checkpoint goes outside the timing
                for step in store.steps():
                    store.delete(step)
            time.sleep(train_s)  # training: the deletion started by the previous save runs meanwhile
            os.sync()
            with ckptstore.knobs.override(retention_in_background=variants[name][1]):
                t0 = time.perf_counter()
                info = store.save(r, state)
                times[name].append(time.perf_counter() - t0)
            spent[name].append(info.timings["retention_wait"] + info.timings["retention"])
        print(r, "  ".join(f"{n}={times[n][-1]:.3f}s" for n in names), flush=True)
    for store in stores.values():
        store.close()
        shutil.rmtree(store.url, ignore_errors=True)
    med = {n: statistics.median(t) for n, t in times.items()}
    for n in names:
        q = statistics.quantiles(times[n], n=4)
        print(
            f"{n:13s} median {med[n]:.3f} s  (quartiles {q[0]:.3f} .. {q[2]:.3f})  {c.nbytes(state) / 1e9:.2f} GB"
            f"  retention on the save's path: median {statistics.median(spent[n]) * 1e3:.1f} ms"
            f" (max {max(spent[n]) * 1e3:.1f} ms)"
        )
    for n in names[1:]:
        # Each round's two saves ran back to back: the ratio of the pair cancels the disk's slow spells
        # that last longer than a round, which the ratio of the medians does not.
        paired = [t / b for t, b in zip(times[n], times["no retention"])]
        q = statistics.quantiles(paired, n=4)
        print(
            f"ratio {n} / no retention: of the medians {med[n] / med['no retention']:.3f};"
            f" per round, median {statistics.median(paired):.3f} (quartiles {q[0]:.3f} .. {q[2]:.3f})"
        )


if __name__ == "__main__":
    main()
