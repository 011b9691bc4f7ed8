"""A restore into an existing module of many small parameters and its AdamW state, against torch.load +
load_state_dict and the readinto ceiling (docs/benchmarks.md, "Parallel reads, cold cache, many small
tensors").

    .venv/bin/python benchmarks/small_restore.py [parameters] [rounds] [dir]

``parameters`` (25,000 by default) of 64 floats each, with AdamW's state: four tensors a parameter. Each
sample is a fresh process (``cases.case_restore_into``, warm page cache); the methods alternate each round.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import cases

TOOLS = ["ckptstore in place", "torch.load+load_state_dict", "readinto (ceiling)"]


def sample(tool: str, src: str, n: int) -> float:
    spec = {"case": "restore_into", "tool": tool, "src": src, "second": False, "cache": "warm", "n_small": n}
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import cases; "
        f"print(json.dumps(cases.case_restore_into({spec!r} | {{'d_model': 0, 'n_layer': 0}})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["seconds"])


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 25_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    src = sys.argv[3] if len(sys.argv) > 3 else f"bench-results/small-restore-{n}"
    if not os.path.exists(os.path.join(src, "raw.bin")):
        cases.case_prepare_into({"case": "prepare_into", "src": src, "n_small": n, "d_model": 0, "n_layer": 0})
    got: dict[str, list[float]] = {t: [] for t in TOOLS}
    for r in range(rounds):
        for tool in TOOLS[r % len(TOOLS) :] + TOOLS[: r % len(TOOLS)]:
            got[tool].append(sample(tool, src, n))
            print(f"round {r + 1}: {tool:28s} {got[tool][-1]:.3f} s", flush=True)
    for tool, v in got.items():
        print(f"{tool:28s} median {statistics.median(v):.3f} s ({min(v):.3f}-{max(v):.3f})")
    ours, torch_s = statistics.median(got[TOOLS[0]]), statistics.median(got[TOOLS[1]])
    print(f"{4 * n} tensors: ckptstore in place is {torch_s / ours:.2f}x torch.load + load_state_dict")


if __name__ == "__main__":
    main()
