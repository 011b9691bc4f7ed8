"""Saves of 100,000 small tensors by two source trees of ckptstore, rotated, a fresh process per round.

    .venv/bin/python benchmarks/compare_trees.py OLD_TREE NEW_TREE [--rounds 3] [--saves 3]

Each tree is a checkout (``git worktree add /tmp/old <commit>``); both run on this ``.venv``. A round runs
each tree once (the first tree first in odd rounds, last in even ones); a process saves the state once
to warm up, then ``--saves`` times, printing each save's seconds. Prints each tree's samples and median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

_CHILD = r"""
import json, os, sys, tempfile, time
import numpy as np
import ckptstore
d = tempfile.mkdtemp()
layers = range(0, 100_000, 100)
state = {f"layer{i // 100}": {f"p{j}": np.full(4, j, np.float32) for j in range(i, i + 100)} for i in layers}
ckptstore.save(os.path.join(d, "warm"), state)
out = []
for k in range(int(sys.argv[1])):
    t = time.perf_counter()
    ckptstore.save(os.path.join(d, f"c{k}"), state)
    out.append(time.perf_counter() - t)
print(json.dumps(out))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trees", nargs=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--saves", type=int, default=3)
    a = p.parse_args()
    samples: dict[str, list[float]] = {t: [] for t in a.trees}
    for r in range(a.rounds):
        for tree in a.trees if r % 2 == 0 else reversed(a.trees):
            env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, str(a.saves)], env=env, cwd="/", capture_output=True, text=True
            )
            if out.returncode:
                sys.exit(out.stderr)
            samples[tree] += json.loads(out.stdout.strip().splitlines()[-1])
    for tree, xs in samples.items():
        print(f"{tree}: median {statistics.median(xs):.3f} s, min {min(xs):.3f}, max {max(xs):.3f} ({len(xs)} saves)")


if __name__ == "__main__":
    main()
