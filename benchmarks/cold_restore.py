"""A restore into an existing model + AdamW from a cold page cache, against the cold sequential read of the
same bytes (docs/benchmarks.md, "Parallel reads, cold cache, many small tensors").

    .venv/bin/python benchmarks/cold_restore.py [rounds] [dir]

Each sample is a fresh process (``cases.case_restore_into`` with ``cache="cold"``: the files evicted with
``/proc/sys/vm/drop_caches`` where allowed, else ``posix_fadvise(DONTNEED)``); the methods are rotated each
round. Prints every sample, then each method's median (min-max) in GB/s and the ratio of ckptstore's median
to each ceiling's: the same bytes read from a file of their own (``raw.bin``) into the tensors, and the
checkpoint's own data file read sequentially (on this VM a cold read's speed depends on the file: only the
latter reads what ckptstore reads).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import cases

TOOLS = [
    "ckptstore in place",
    "ckptstore in place, 1 thread",
    "readinto its file (ceiling)",
    "readinto (ceiling)",
    "torch.load+load_state_dict",
]
SPEC = {"d_model": 512, "n_layer": 8}  # 0.58 GiB of parameters and AdamW state


def sample(tool: str, src: str) -> float:
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import cases; "
        f"r = cases.case_restore_into({{'case': 'restore_into', 'tool': {tool!r}, 'src': {src!r}, "
        f"'second': False, 'cache': 'cold', **{SPEC!r}}}); print(json.dumps(r))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return float(r["bytes"] / r["seconds"] / 1e9)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    src = sys.argv[2] if len(sys.argv) > 2 else "bench-results/cold-restore"
    if not os.path.exists(os.path.join(src, "raw.bin")):
        cases.case_prepare_into({"case": "prepare_into", "src": src, **SPEC})
    got: dict[str, list[float]] = {t: [] for t in TOOLS}
    for r in range(rounds):
        for tool in TOOLS[r % len(TOOLS) :] + TOOLS[: r % len(TOOLS)]:
            got[tool].append(sample(tool, src))
            print(f"round {r + 1}: {tool:32s} {got[tool][-1]:.2f} GB/s", flush=True)
    for tool, v in got.items():
        print(f"{tool:32s} median {statistics.median(v):.2f} GB/s ({min(v):.2f}-{max(v):.2f})")
    ours = statistics.median(got[TOOLS[0]])
    for ceiling in ("readinto its file (ceiling)", "readinto (ceiling)"):
        print(f"ckptstore in place / {ceiling}: {ours / statistics.median(got[ceiling]):.2f}")


if __name__ == "__main__":
    main()
