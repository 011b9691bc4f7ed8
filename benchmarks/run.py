"""ckptstore benchmarks against the machine's ceilings and the peers, each measurement in a fresh process.

    .venv/bin/python benchmarks/run.py            # full: ~1 GiB state, 5 runs each (several minutes)
    .venv/bin/python benchmarks/run.py --quick    # ~256 MiB state, 3 runs, fewer small tensors (~2 min)
    .venv/bin/python benchmarks/run.py --only save,restore --runs 7 --dir /mnt/nvme/bench

Prints a table (medians) and writes every sample to bench-results/<time>.json. Runs of different tools
are interleaved (run 1 of every tool, then run 2, ..., each round starting with the next tool) so that a
disk that changes speed over time affects every tool alike. See docs/benchmarks.md for what each case measures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MARK = "BENCH-RESULT "
GiB = 1 << 30


# --- child side -----------------------------------------------------------------------------------------


def child(spec_json: str) -> None:
    sys.path.insert(0, str(HERE))
    import cases

    res = cases.run(json.loads(spec_json))
    print(MARK + json.dumps(res), flush=True)


# --- parent side ----------------------------------------------------------------------------------------


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.dir).resolve() / f"work-{os.getpid()}"
        self.work.mkdir(parents=True, exist_ok=True)
        self.results: list[dict[str, Any]] = []
        self.skipped: dict[str, str] = {}
        self.n_small = 10_000 if args.quick else 100_000
        self.env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def child(self, spec: dict[str, Any], timeout: float = 900) -> dict[str, Any] | None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env, cwd=ROOT)
        except subprocess.TimeoutExpired:
            self.skip(spec, f"timed out after {timeout:.0f} s")
            return None
        line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith(MARK)), None)
        if p.returncode != 0 or line is None:
            err = (p.stderr.strip().splitlines() or ["?"])[-1]
            self.skip(spec, f"failed: {err[:300]}")
            return None
        return dict(json.loads(line[len(MARK) :]))

    def skip(self, spec: dict[str, Any], why: str) -> None:
        key = f"{spec['case']}/{spec.get('tool', '')}"
        if key not in self.skipped:
            self.skipped[key] = why
            print(f"  ! {key}: {why}", file=sys.stderr)

    def measure(self, group: str, specs: dict[str, dict[str, Any]], runs: int) -> None:
        """``runs`` runs of every spec (label -> spec), interleaved; samples go to the results."""
        samples: dict[str, list[dict[str, Any]]] = {label: [] for label in specs}
        failed: set[str] = set()
        labels = list(specs)
        for run in range(runs):
            # Rotated: round k starts with the k-th tool, so no tool always follows the same one (on this VM
            # a save that follows the deletion of another tool's 1 GiB output can run at a fifth of the speed).
            for label in labels[run % len(labels) :] + labels[: run % len(labels)]:
                spec = specs[label]
                if label in failed:
                    continue
                res = self.child(spec)
                if res is None:
                    failed.add(label)  # a tool that fails once is not run again
                else:
                    samples[label].append(res)
        for label, got in samples.items():
            if got:
                self.results.append({"group": group, "label": label, "spec": specs[label], "samples": got})
                print(f"  {group:<14} {label:<34} {_fmt_row(got)}", flush=True)

    def get(self, group: str, label: str) -> list[dict[str, Any]]:
        for r in self.results:
            if r["group"] == group and r["label"] == label:
                return list(r["samples"])
        return []


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def med(samples: list[dict[str, Any]], key: str = "seconds") -> float:
    vals = [s[key] for s in samples if s.get(key) is not None]
    return _median(vals) if vals else float("nan")


def _fmt_row(samples: list[dict[str, Any]]) -> str:
    t = med(samples)
    gbps = med(samples, "bytes") / t / 1e9 if t > 0 else float("nan")
    extra = ""
    if samples[0].get("cpu_seconds") is not None:
        extra += f"  cpu {med(samples, 'cpu_seconds') * 1000:8.1f} ms"
    if samples[0].get("extra_peak", -1) >= 0:
        extra += f"  peak +{med(samples, 'extra_peak') / 2**20:7.1f} MiB"
    return f"{t * 1000:9.1f} ms  {gbps:6.2f} GB/s  (n={len(samples)}){extra}"


# --- the plan -------------------------------------------------------------------------------------------


def plan(r: Runner) -> None:
    a = r.args
    big = {"state": "gpt2", **({"d_model": 512, "n_layer": 12} if a.quick else {"d_model": 1200, "n_layer": 12})}
    n_small = r.n_small
    small = {"state": "small", "n_tensors": n_small}
    runs = a.runs or (2 if a.quick else 5)
    full = not a.quick
    only = set(a.only.split(",")) if a.only else None
    w = r.work

    def want(name: str) -> bool:
        return only is None or name in only

    sys.path.insert(0, str(HERE))
    import common

    state_bytes = 4 * sum(math.prod(s) for s in common.gpt2_shapes(big["d_model"], big["n_layer"]).values())
    print(f"state: {big}, {state_bytes / 2**30:.2f} GiB; small: {n_small} tensors; {runs} runs each", flush=True)

    if want("ceilings"):
        print("ceilings", flush=True)
        r.measure("ceiling", {"memcpy": {"case": "memcpy", "bytes": state_bytes}}, runs)
        r.measure(
            "ceiling",
            {
                "write+fsync": {"case": "save", "tool": "raw", "out": str(w / "raw"), **big},
                "write+fsync (early writeback)": {
                    "case": "save",
                    "tool": "raw_early_writeback",
                    "out": str(w / "raw"),
                    **big,
                },
            },
            runs,
        )
        r.child({"case": "save", "tool": "raw", "out": str(w / "rawread"), "keep": True, **big})
        src = str(w / "rawread" / "raw.bin")
        r.measure(
            "ceiling",
            {f"read ({cache})": {"case": "read_ceiling", "src": src, "cache": cache} for cache in ("cold", "warm")},
            runs,
        )

    if want("save"):
        print("1. blocking save (fsync included) / 2. peak extra memory / 6. checksums", flush=True)
        # The raw writers run in the same rotation: the saves' ceiling is taken from the same minutes.
        tools = ["raw", "raw_early_writeback", "ckptstore", "ckptstore_nohash", "torch.save", "safetensors"]
        if full:
            tools += ["ckptstore_torch", "np.save", "dcp", "dcp.async_save"]
            tools += ["orbax"] if _has("orbax.checkpoint") else []
        r.measure("save", {t: {"case": "save", "tool": t, "out": str(w / "save"), **big} for t in tools}, runs)
        if not _has("orbax.checkpoint"):
            r.skipped["save/orbax"] = "orbax-checkpoint is not installed (make bench installs it)"
        r.measure("hashcost", {"ckptstore": {"case": "hashcost", "out": str(w), **big}}, 1)

    if want("restore"):
        print("3. restore (to host memory) and lazy read of one tensor", flush=True)
        writers = {"ckptstore": "ckptstore", "torch": "torch.save", "safetensors": "safetensors"}
        if full:
            writers.update({"np": "np.save", "dcp": "dcp"})
            writers.update({"orbax": "orbax"} if _has("orbax.checkpoint") else {})
        srcs: dict[str, str] = {}
        keys: list[str] | None = None
        for name, writer in writers.items():
            res = r.child({"case": "prepare", "writer": writer, "src": str(w / f"restore-{name}"), **big})
            if res is not None:
                srcs[name] = str(w / f"restore-{name}")
                keys = res.get("keys") or keys
        readers = {
            "ckptstore": "ckptstore",
            "ckptstore+verify": "ckptstore",
            "ckptstore_torch": "ckptstore",
            "ckptstore(mmap)+touch": "ckptstore",
            "ckptstore(mmap)+verify": "ckptstore",
            "torch.load": "torch",
            "torch.load(mmap)+touch": "torch",
            "safetensors.load_file": "safetensors",
            "safetensors.safe_open": "safetensors",
            "np.load": "np",
            "np.load(mmap)+touch": "np",
            "dcp": "dcp",
            "orbax": "orbax",
            # The same restores a second time in one process (the first, untimed, is dropped): the memory
            # they fill was touched before, which on this VM costs a fraction of first-touch memory.
            "ckptstore [2nd]": "ckptstore",
            "ckptstore+verify [2nd]": "ckptstore",
            "torch.load [2nd]": "torch",
            "safetensors.load_file [2nd]": "safetensors",
        }
        common = {"case": "restore", "bytes": state_bytes, "keys": keys, **big}
        if not full:
            quick = ("ckptstore", "ckptstore+verify", "ckptstore(mmap)+verify", "torch.load", "safetensors.load_file")
            quick += ("ckptstore [2nd]", "ckptstore+verify [2nd]", "torch.load [2nd]")
            readers = {k: readers[k] for k in quick}
        for cache in ("warm", "cold"):
            specs = {
                f"{tool} ({cache})": {
                    **common,
                    "tool": tool.removesuffix(" [2nd]"),
                    "src": srcs[src],
                    "cache": cache,
                    "second": tool.endswith("[2nd]"),
                }
                for tool, src in readers.items()
                if src in srcs
                and (cache == "warm" or (not tool.endswith("[2nd]") and (full or tool in ("ckptstore", "torch.load"))))
            }
            r.measure(f"restore-{cache}", specs, runs)
        lazy = {"ckptstore": "ckptstore", "torch.load(mmap)": "torch", "safetensors.safe_open": "safetensors"}
        lazy["np.load(mmap)"] = "np"
        one = 4 * 4 * 1200 * 1200 if not a.quick else 4 * 4 * 512 * 512
        r.measure(
            "lazy-one",
            {
                f"{tool} (cold)": {
                    **common,
                    "tool": tool,
                    "src": srcs[src],
                    "cache": "cold",
                    "lazy_one": True,
                    "bytes": one,
                }
                for tool, src in lazy.items()
                if src in srcs
            },
            runs,
        )

    if want("small"):
        print(f"4. {n_small} small tensors", flush=True)
        tools = ["raw", "ckptstore", "torch.save"] + (["safetensors"] if full else [])
        r.measure("small-save", {t: {"case": "save", "tool": t, "out": str(w / "small"), **small} for t in tools}, runs)
        srcs = {}
        writers = {"ckptstore": "ckptstore", "torch": "torch.save"} | ({"safetensors": "safetensors"} if full else {})
        for name, writer in writers.items():
            if r.child({"case": "prepare", "writer": writer, "src": str(w / f"small-{name}"), **small}) is not None:
                srcs[name] = str(w / f"small-{name}")
        sb = r.get("small-save", "raw")
        readers = {"ckptstore": "ckptstore", "ckptstore+verify": "ckptstore", "torch.load": "torch"}
        readers["safetensors.load_file"] = "safetensors"
        r.measure(
            "small-restore",
            {
                f"{t} (warm)": {
                    "case": "restore",
                    "tool": t,
                    "src": srcs[s],
                    "cache": "warm",
                    "bytes": sb[0]["bytes"] if sb else 0,
                    **small,
                }
                for t, s in readers.items()
                if s in srcs
            },
            runs,
        )

    if want("into"):
        print("8. restore into an existing model + AdamW (a resume; issue #15)", flush=True)
        # d_model 512, 8 layers: 0.58 GiB of parameters and AdamW state (the measurement).
        into = {"d_model": 512, "n_layer": 8} if a.quick else {"d_model": 1200, "n_layer": 12}
        src = str(w / "into")
        if r.child({"case": "prepare_into", "src": src, **into}) is not None:
            tools = ["torch.load+load_state_dict", "ckptstore in place", "ckptstore in place verify=False"]
            tools += ["ckptstore in place, 1 thread", "readinto (ceiling)"]
            specs = {}
            for cache, second in (("warm", False), ("warm", True), ("cold", False)):
                for t in tools:
                    if second and ("verify=False" in t or "1 thread" in t):
                        continue
                    label = (
                        t + {("warm", False): "", ("warm", True): " [2nd]", ("cold", False): " (cold)"}[cache, second]
                    )
                    specs[label] = {"case": "restore_into", "tool": t, "src": src, "second": second, "cache": cache}
                    specs[label].update(into)
            r.measure("into", specs, runs)
        # Many small tensors: 25,000 parameters of 64 floats and their AdamW state, 100,000 tensors.
        small_into = {"n_small": 25_000 if not a.quick else 5_000, "d_model": 0, "n_layer": 0}
        src = str(w / "into-small")
        if r.child({"case": "prepare_into", "src": src, **small_into}) is not None:
            tools = ["torch.load+load_state_dict", "ckptstore in place", "readinto (ceiling)"]
            specs = {
                t: {"case": "restore_into", "tool": t, "src": src, "second": False, "cache": "warm", **small_into}
                for t in tools
            }
            r.measure("into-small", specs, runs)

    if want("async"):
        print("5. async save: stall of a training loop", flush=True)
        common = {"case": "async", "out": str(w / "async"), "matmul": 256 if a.quick else 384, **big}
        tools = ["ckptstore", "dcp"] if full else ["ckptstore"]
        r.measure("async", {t: {**common, "tool": t} for t in tools}, 3 if full else 1)

    if want("s3"):
        print("7. S3 (SeaweedFS, or moto where weed is missing, on loopback)", flush=True)
        s3(r, {"state": "gpt2", "d_model": 128 if a.quick else 512, "n_layer": 2 if a.quick else 8}, runs)


def s3(r: Runner, state: dict[str, Any], runs: int) -> None:
    sys.path.insert(0, str(ROOT))
    try:
        import boto3

        from tests import s3server
    except ImportError as e:
        r.skipped["s3"] = f"needs moto[server], boto3 and tests/s3server.py ({e})"
        return
    os.environ.update(s3server.credentials_env())
    r.env.update(s3server.credentials_env())
    # SeaweedFS is a production S3 server and far faster than moto, which would measure itself.
    if s3server.weed_binary() is not None:
        data = r.work / "seaweedfs"
        data.mkdir(parents=True, exist_ok=True)
        server, name = s3server.seaweedfs(data), "seaweedfs"
    else:
        server, name = s3server.moto(r.work), "moto"
    print(f"  S3 server: {name}", flush=True)
    with server as srv:
        bucket = s3server.new_bucket_name()
        boto3.client("s3", endpoint_url=srv.endpoint, region_name=s3server.REGION).create_bucket(Bucket=bucket)
        opts = s3server.storage_options(srv.endpoint)
        base = {"case": "s3", "server": name, "url": f"s3://{bucket}/run", "storage_options": opts, **state}
        for op in ("save", "restore"):
            specs = {}
            for tool in ("ckptstore", "s3fs"):
                specs[tool] = {**base, "tool": tool, "op": op, "step": 0}
            if op == "save":
                # Each save writes a new step/object; the restores read step 0 written by the first run.
                counter = iter(range(1, 1000))
                measured: dict[str, list[dict[str, Any]]] = {t: [] for t in specs}
                for i in range(runs):
                    for tool, spec in specs.items():
                        res = r.child({**spec, "step": 0 if i == 0 else next(counter)})
                        if res is not None:
                            measured[tool].append(res)
                for tool, got in measured.items():
                    if got:
                        r.results.append({"group": "s3-save", "label": tool, "spec": specs[tool], "samples": got})
                        print(f"  {'s3-save':<14} {tool:<34} {_fmt_row(got)}  requests={got[0]['requests']}")
            else:
                r.measure("s3-restore", specs, runs)
                for tool in specs:
                    got = r.get("s3-restore", tool)
                    if got:
                        print(f"  {'':<14} {tool:<34} requests={got[0]['requests']}")


def _has(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# --- the table ------------------------------------------------------------------------------------------


def summary(r: Runner) -> list[tuple[str, str, str, str]]:
    """Rows of (what, figure, fraction of the ceiling, against the peer / target)."""
    rows: list[tuple[str, str, str, str]] = []

    def t(group: str, label: str, key: str = "seconds") -> float:
        return med(r.get(group, label), key)

    def gbps(group: str, label: str) -> float:
        s = r.get(group, label)
        return med(s, "bytes") / med(s) / 1e9 if s else float("nan")

    wr = max(gbps("ceiling", "write+fsync"), gbps("ceiling", "write+fsync (early writeback)"))
    rc, rw = gbps("ceiling", "read (cold)"), gbps("ceiling", "read (warm)")
    mc = gbps("ceiling", "memcpy")
    if r.get("ceiling", "memcpy"):  # (not with --only: no ceiling was measured)
        rows.append(("ceiling: write+fsync (best of plain / early writeback)", f"{wr:.2f} GB/s", "1.00", ""))
        rows.append(("ceiling: read cold / warm", f"{rc:.2f} / {rw:.2f} GB/s", "", ""))
        rows.append(("ceiling: memcpy (touched memory)", f"{mc:.2f} GB/s", "", ""))
    fresh = r.get("ceiling", "memcpy")
    if fresh:
        g = med(fresh, "bytes") / med(fresh, "fresh_seconds") / 1e9
        rows.append(("ceiling: copy into fresh memory, huge pages (np.empty)", f"{g:.2f} GB/s", "", ""))
        if fresh[0].get("fresh_4k_seconds"):
            g = med(fresh, "bytes") / med(fresh, "fresh_4k_seconds") / 1e9
            rows.append(("ceiling: copy into fresh memory, 4 KiB pages", f"{g:.2f} GB/s", "", ""))
    ours = gbps("save", "ckptstore")
    # Saves against the raw writers of their own rounds (the disk's speed drifts between groups).
    same_run = max(gbps("save", "raw"), gbps("save", "raw_early_writeback"))
    if same_run == same_run:
        wr = same_run
        rows.append(("ceiling: write+fsync, best raw writer among the saves", f"{wr:.2f} GB/s", "1.00", ""))
    for label in (
        "ckptstore",
        "ckptstore_torch",
        "ckptstore_nohash",
        "raw",
        "raw_early_writeback",
        "torch.save",
        "safetensors",
        "np.save",
        "dcp",
        "dcp.async_save",
        "orbax",
    ):
        g = gbps("save", label)
        if g == g:
            vs = f"ckptstore is {ours / g:.2f}x" if label not in ("ckptstore",) else ""
            cpu = med(r.get("save", label), "cpu_seconds")
            vs += f"; cpu {cpu:.2f} s" if cpu == cpu else ""
            rows.append((f"1. save {label}", f"{g:.2f} GB/s", f"{g / wr:.2f}", vs))
    sb = med(r.get("save", "ckptstore"), "state_bytes")
    for label in ("ckptstore", "torch.save", "safetensors", "dcp"):
        s = r.get("save", label)
        if s and s[0].get("extra_peak", -1) >= 0:
            x = med(s, "extra_peak")
            rows.append((f"2. peak extra RSS, save {label}", f"{x / 2**20:.1f} MiB", f"{x / sb:.3f} of state", ""))
    nohash = t("save", "ckptstore_nohash")
    if nohash == nohash:
        cost = (t("save", "ckptstore") - nohash) / t("save", "ckptstore")
        xx = med(r.get("ceiling", "memcpy"), "xxh3_seconds")
        rows.append(("6. checksum cost (save - save without xxh3) / save", f"{cost * 100:.1f} %", "", "target <= 5 %"))
        rows.append(
            ("6. xxh3 of the state in memory / save time", f"{xx / t('save', 'ckptstore') * 100:.1f} %", "", "")
        )
    hc = r.get("hashcost", "ckptstore")
    if hc:
        with_hash, without = med(hc), med(hc, "nohash_s")
        rows.append(
            (
                "6. checksum cost, write loop into memory (no disk)",
                f"{(with_hash - without) / with_hash * 100:.1f} %",
                "",
                f"{with_hash * 1000:.0f} ms with xxh3, {without * 1000:.0f} ms without; target <= 5 %",
            )
        )
    for cache, ceil in (("warm", rw), ("cold", rc)):
        base = gbps(f"restore-{cache}", f"torch.load ({cache})")
        for res in r.results:
            if res["group"] == f"restore-{cache}":
                g = gbps(res["group"], res["label"])
                rows.append(
                    (f"3. restore {res['label']}", f"{g:.2f} GB/s", f"{g / ceil:.2f}", f"{g / base:.2f}x torch.load")
                )
    for res in r.results:
        if res["group"] == "into-small":
            g, base = gbps("into-small", res["label"]), gbps("into-small", "torch.load+load_state_dict")
            ceil = gbps("into-small", "readinto (ceiling)")
            n = res["spec"]["n_small"] * 4
            rows.append(
                (
                    f"8. restore into {n} small tensors {res['label']}",
                    f"{med(r.get('into-small', res['label'])) * 1000:.0f} ms",
                    f"{g / ceil:.2f}",
                    f"{g / base:.2f}x torch.load+load_state_dict",
                )
            )
    for res in r.results:
        if res["group"] == "into":
            second = next((x for x in (" [2nd]", " (cold)") if res["label"].endswith(x)), "")
            base = gbps("into", f"torch.load+load_state_dict{second}")
            ceil = gbps("into", f"readinto (ceiling){second}")
            g = gbps("into", res["label"])
            peak = med(r.get("into", res["label"]), "extra_peak") / med(r.get("into", res["label"]), "bytes")
            rows.append(
                (
                    f"8. restore into model+AdamW {res['label']}",
                    f"{g:.2f} GB/s",
                    f"{g / ceil:.2f}",
                    f"{g / base:.2f}x torch.load+load_state_dict; peak +{peak * 100:.0f} % of the state",
                )
            )
    for res in r.results:
        if res["group"] == "lazy-one":
            rows.append(
                (f"3. one tensor, {res['label']}", f"{t('lazy-one', res['label']) * 1000:.1f} ms", "", "target < 50 ms")
            )
    s_raw = r.get("small-save", "raw")
    if s_raw:
        n = s_raw[0].get("state_bytes", 0)
        raw_s = med(s_raw)
        ts = t("small-save", "torch.save")
        for label in ("ckptstore", "torch.save", "safetensors"):
            s = r.get("small-save", label)
            if s:
                over = (med(s) - raw_s) / r.n_small * 1e6
                man = s[0].get("manifest_bytes")
                extra = f", manifest {man / 1e6:.2f} MB" if man else ""
                rows.append(
                    (
                        f"4. small save {label}",
                        f"{med(s) * 1000:.0f} ms",
                        f"{(n / med(s) / 1e9) / wr:.2f}",
                        f"{ts / med(s):.2f}x torch.save; +{over:.1f} us/tensor over raw{extra}",
                    )
                )
        tl = t("small-restore", "torch.load (warm)")
        for res in r.results:
            if res["group"] == "small-restore":
                m = t("small-restore", res["label"])
                rows.append(
                    (
                        f"4. small restore {res['label']}",
                        f"{m * 1000:.0f} ms",
                        "",
                        f"{tl / m:.2f}x torch.load; {m / r.n_small * 1e6:.1f} us/tensor",
                    )
                )
    for label in ("ckptstore", "dcp"):
        s = r.get("async", label)
        if s:
            b, cp, bl = med(s, "steady_blocked_s"), med(s, "copy_s"), med(s, "blocking_save_s")
            rows.append(
                (
                    f"5. async {label}: save() blocks (steady / first)",
                    f"{b * 1000:.0f} / {med(s, 'first_blocked_s') * 1000:.0f} ms",
                    f"{b / cp:.2f}x copy",
                    f"{b / bl:.2f}x blocking save (targets 1.5x, 0.3x)",
                )
            )
            if s[0].get("fresh_copy_s"):
                first, fresh = med(s, "first_blocked_s"), med(s, "fresh_copy_s")
                rows.append(
                    (
                        f"5. async {label}: first save() of the process",
                        f"{first * 1000:.0f} ms",
                        f"{first / fresh:.2f}x fresh copy",
                        f"copy into fresh memory {fresh * 1000:.0f} ms",
                    )
                )
            sl = med(s, "steady_step_slowdown")
            rows.append(
                (
                    f"5. async {label}: loop step while writing",
                    f"{sl:.2f}x",
                    "",
                    f"save in flight {med(s, 'steady_total_s') * 1000:.0f} ms",
                )
            )
    for op in ("save", "restore"):
        base = gbps(f"s3-{op}", "s3fs")
        for label in ("ckptstore", "s3fs"):
            s = r.get(f"s3-{op}", label)
            if s:
                g = gbps(f"s3-{op}", label)
                rows.append(
                    (f"7. S3 {op} {label}", f"{g:.3f} GB/s", "", f"{g / base:.2f}x s3fs; {s[0]['requests']} requests")
                )
    return rows


def print_table(rows: list[tuple[str, str, str, str]], skipped: dict[str, str]) -> None:
    w = max(len(x[0]) for x in rows) if rows else 10
    print("\n" + f"{'case':<{w}}  {'median':>18}  {'/ceiling':>14}  vs")
    for what, fig, frac, vs in rows:
        print(f"{what:<{w}}  {fig:>18}  {frac:>14}  {vs}")
    for k, why in skipped.items():
        print(f"skipped {k}: {why}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller state, 3 runs (about 2 minutes)")
    ap.add_argument("--runs", type=int, default=0, help="runs per measurement (default 5, quick 3)")
    ap.add_argument("--only", default="", help="comma-separated: ceilings,save,restore,small,async,s3,into")
    ap.add_argument("--dir", default=str(ROOT / "bench-results"), help="where to write (the disk under test)")
    ap.add_argument("--out", default="", help="JSON file (default bench-results/<time>.json)")
    ap.add_argument("--report", default="", help="print the table of a saved JSON file and exit")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        args.quick = "--quick" in saved["command"].split()
        r = Runner(args)
        shutil.rmtree(r.work, ignore_errors=True)
        r.results, r.skipped = saved["results"], saved["skipped"]
        print(f"{saved['command']}  ({saved['when']}, {saved['seconds']:.0f} s)")
        print_table(summary(r), r.skipped)
        return
    t0 = time.time()
    r = Runner(args)
    try:
        plan(r)
    finally:
        shutil.rmtree(r.work, ignore_errors=True)
    rows = summary(r)
    print_table(rows, r.skipped)
    doc = {
        "command": " ".join(["benchmarks/run.py", *sys.argv[1:]]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": time.time() - t0,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "results": r.results,
        "table": rows,
        "skipped": r.skipped,
    }
    out = Path(args.out) if args.out else ROOT / "bench-results" / time.strftime("%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"\n{time.time() - t0:.0f} s; samples in {out}")


if __name__ == "__main__":
    main()
