"""The ``ckptstore`` command: look at stores and checkpoints from a shell.

    ckptstore ls URL [--json] [--best-metric NAME [--best-mode min|max]]
                                             committed steps: step, time, size, metadata; the best by
                                             metadata[NAME] marked
    ckptstore show URL [--step N] [--json]   the tree of one checkpoint: key path, dtype and shape, or value
    ckptstore verify URL [--step N]          check every byte of every checkpoint (or one); exit status 1 if
                                             damaged or missing
    ckptstore export URL --to DIR [--step N] [--keys model] [--format hf] [--max-shard-size SIZE]
                                             a model's weights as the Hugging Face hub lays them out
    ckptstore watch URL [--timeout S] [--every]   print each new checkpoint's path as it is committed
    ckptstore rm URL STEP... [--dry-run] [--force]  delete checkpoints; one a reader pins is refused
    ckptstore prune URL --keep-last N [--keep-every-n-steps K] [--keep-every-n-hours H] [--dry-run]
                                             apply retention once; pinned checkpoints are kept

URL is a store root or (for ``show``, ``verify`` and ``export``) one checkpoint directory; ``-o key=value``
passes fsspec storage options (values are parsed as JSON where they can be: ``-o anon=true``). ``verify``
and ``export`` show a progress bar on stderr when it is a terminal (``--progress``: always,
``--no-progress``: never). ``python -m ckptstore`` runs the same command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from . import leases, load
from .errors import CheckpointNotFoundError, CkptStoreError, ConfigError
from .export import DEFAULT_MAX_SHARD_SIZE, export_hf
from .manifest import Manifest
from .progress import Progress, bar
from .retention import Retention, RetentionPolicy, delete_unpinned, metric_value, rank_best
from .skeleton import NamedTuple, PerRankValues, Scalar, ShardedRef, Stateful, TensorRef, render_path, walk
from .storage import Storage, open_parent, parse_step, step_name, url_to_fs
from .store import CheckpointStore

Command = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, Command] = {}


def command(name: str) -> Callable[[Command], Command]:
    """Register a subcommand's handler (its arguments are declared in :func:`build_parser`)."""

    def register(fn: Command) -> Command:
        _COMMANDS[name] = fn
        return fn

    return register


def _options(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise CkptStoreError(f"storage option {pair!r} is not key=value")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _time(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).isoformat(sep=" ", timespec="seconds")


def _printable(text: str) -> str:
    """``text`` with control characters escaped: what a hostile manifest holds must not drive the terminal."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _json_key(k: Any) -> Any:
    return k if k is None or type(k) in (str, int, float, bool) else repr(k)


def _json_ready(x: Any) -> Any:
    """Metadata as json.dumps takes it: keys of other types than str and numbers (only a damaged or hostile
    manifest has them) as their repr; values json cannot hold become their repr through ``default``."""
    if type(x) is dict:
        return {_json_key(k): _json_ready(v) for k, v in x.items()}
    if type(x) in (list, tuple):
        return [_json_ready(v) for v in x]
    return x


def _safe_repr(x: Any) -> str:
    try:
        return repr(x)
    except Exception as e:  # an int past sys.get_int_max_str_digits(), ...
        return f"<{type(x).__name__}: {type(e).__name__}>"


def _metadata_text(metadata: Any) -> str:
    try:
        return json.dumps(_json_ready(metadata), default=_safe_repr)
    except Exception as e:  # a value json.dumps refuses after all: show what can be shown
        return _safe_repr(metadata) + f"  (not JSON: {type(e).__name__})"


def _odd_keys(x: Any, found: list[str], where: str = "metadata") -> None:
    """Keys a save never writes (a save writes str and int keys only): each is a sign of damage."""
    stack = [(where, x)]
    while stack and len(found) < 3:
        at, node = stack.pop()
        if type(node) is dict:
            for k, v in node.items():
                if type(k) not in (str, int):
                    found.append(f"{at} has a key of type {type(k).__name__} ({_safe_repr(k)[:40]})")
                stack.append((f"{at}[{_safe_repr(k)[:40]}]", v))
        elif type(node) in (list, tuple):
            stack.extend((f"{at}[{i}]", v) for i, v in enumerate(node))


def _describe_checkpoint(created: Any, nbytes: Any, metadata: Any) -> tuple[str, str, str, list[str]]:
    """(creation time, size, metadata) as text, and what is wrong with them: every field of a damaged or
    hostile manifest is shown as far as it can be, never raised."""
    problems: list[str] = []
    try:
        when = _time(created)
    except (OverflowError, ValueError, OSError, TypeError):  # 1e300, year 0, ...
        when = "?"
        problems.append(f"creation time {_safe_repr(created)} is out of range")
    try:
        size = _human(nbytes)
    except (OverflowError, ValueError, TypeError):
        size = "?"
        problems.append(f"size {_safe_repr(nbytes)[:40]} is out of range")
    _odd_keys(metadata, problems)
    meta = _metadata_text(metadata) if metadata else ""
    return when, size, meta, problems


# --- JSON output: every value as JSON holds it, whatever a damaged or hostile manifest says -----------------

#: Ints beyond 64 bits are written as strings (JSON readers lose precision far below that; Python cannot even
#: print an int past ``sys.get_int_max_str_digits()`` digits).
_JSON_INT_LIMIT = 1 << 64


def _big_int(n: int) -> str:
    try:
        return str(n)
    except ValueError:  # past sys.get_int_max_str_digits()
        return f"<int of {n.bit_length()} bits>"


def _plain_key(k: Any) -> str:
    t = type(k)
    if t is str:
        return k
    if t is bool or k is None:
        return json.dumps(k)  # as json.dumps writes them: "true", "null"
    if t is int:
        return str(k) if -_JSON_INT_LIMIT < k < _JSON_INT_LIMIT else _big_int(k)
    return _safe_repr(k)  # float (nan too), bytes, tuple, ...: only a damaged or hostile manifest has them


def _plain(x: Any) -> Any:
    """``x`` as plain JSON values (str, finite numbers, bools, None, lists, dicts with str keys), so that
    ``json.dumps(..., allow_nan=False)`` never fails: bytes, complex numbers, NumPy scalars and any other type
    become their repr; non-finite floats "nan", "inf", "-inf"; ints past 64 bits strings; tuples lists; keys
    of other types than str their text (with their type appended where that text is taken already)."""
    t = type(x)
    if x is None or t is bool or t is str:
        return x
    if t is int:
        return x if -_JSON_INT_LIMIT < x < _JSON_INT_LIMIT else _big_int(x)
    if t is float:
        return x if math.isfinite(x) else repr(x)
    if t is dict:
        taken = {k for k in x if type(k) is str}  # a str key is written as it is; another type yields to it
        out: dict[str, Any] = {}
        for k, v in x.items():
            key = k if type(k) is str else _plain_key(k)
            if type(k) is not str and (key in taken or key in out):
                key = f"{key} ({type(k).__name__})"
                while key in taken or key in out:
                    key += "'"
            out[key] = _plain(v)
        return out
    if t in (list, tuple):
        return [_plain(v) for v in x]
    return _safe_repr(x)


def _iso(t: Any) -> str | None:
    """A creation time as ISO 8601 with the local UTC offset; None if it is no time."""
    if type(t) not in (int, float):
        return None
    try:
        return datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")
    except (OverflowError, ValueError, OSError):
        return None


def _print_json(doc: Any) -> None:
    # ensure_ascii: nothing a hostile manifest holds reaches the terminal unescaped.
    print(json.dumps(doc, indent=2, ensure_ascii=True, allow_nan=False))


# --- ls ------------------------------------------------------------------------------------------------


def _store(args: argparse.Namespace) -> CheckpointStore:
    return CheckpointStore(args.url, storage_options=_options(args.option))


def _require_store(store: CheckpointStore, args: argparse.Namespace) -> None:
    """Raise unless something exists at URL (an existing directory without checkpoints is an empty store; on
    an object store a prefix exists once some object lies under it)."""
    fs, path = url_to_fs(args.url, _options(args.option))
    with store.storage.named_errors(f"looking for {store.url}"):
        found = fs.exists(path)
    if not found:
        raise CheckpointNotFoundError(f"{store.url} does not exist: no store there")


@command("ls")
def _ls(args: argparse.Namespace) -> int:
    metric = args.best_metric
    if args.best_mode is not None and metric is None:
        print("ckptstore ls: --best-mode needs --best-metric", file=sys.stderr)
        return 2
    mode = args.best_mode or "min"
    store = _store(args)
    steps = store.steps()
    if not steps:
        _require_store(store, args)
    rows: list[tuple[str, ...]] = []
    records: list[dict[str, Any]] = []
    metrics: list[tuple[int, float | None]] = []  # (step, metric) of the readable checkpoints
    status = 0
    for step in steps:
        path = store.storage.url_of(step_name(step))
        try:
            info = store.info(step)
        except ConfigError:
            raise  # a bad CKPTSTORE_* setting is no damage of the checkpoint's
        except Exception as e:  # one damaged manifest must not hide the other checkpoints
            if isinstance(e, CheckpointNotFoundError) and not store.storage.is_committed(step_name(step)):
                continue  # deleted meanwhile (retention)
            rows.append((str(step), "?", "?", f"DAMAGED: {_reason(e)}"))
            records.append(_record(step, path, None, None, None, [_reason(e)]))
            status = 1
            continue
        when, size, meta, problems = _describe_checkpoint(info.created, info.nbytes, info.metadata)
        if info.step != step:
            problems.insert(0, f"its manifest is that of step {info.step}")
        records.append(_record(step, path, info.created, info.nbytes, info.metadata, problems))
        if problems:
            meta = f"DAMAGED: {'; '.join(problems)}" + (f"  {meta}" if meta else "")
            status = 1
        elif metric is not None:
            metrics.append((step, metric_value(info.metadata, metric)))
        rows.append((str(step), when, size, meta))
    header: tuple[str, ...] = ("STEP", "CREATED", "SIZE", "METADATA")
    if metric is not None:
        # The ranking retention's keep_best uses (ties to the newer step; NaN and non-numbers never best).
        ranked = rank_best(metrics, mode)
        best = ranked[0] if ranked else None
        for record in records:
            record["best"] = record["step"] == best
        header = ("STEP", "BEST", "CREATED", "SIZE", "METADATA")
        rows = [(r[0], "*" if r[0] == str(best) else "", *r[1:]) for r in rows]
        if best is None and rows and not args.json:
            print(_printable(f"ckptstore ls: no checkpoint has a number at metadata[{metric!r}]"), file=sys.stderr)
    if args.json:
        _print_json(records)
        return status
    rows.insert(0, header)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    for r in rows:
        cells = [f"{r[0]:>{widths[0]}}", *(f"{c:<{w}}" for c, w in zip(r[1:-2], widths[1:-1], strict=True))]
        line = "  ".join([*cells, f"{r[-2]:>{widths[-1]}}", r[-1]]).rstrip()
        print(_printable(line))
    return status


def _record(step: int, path: str, created: Any, nbytes: Any, metadata: Any, problems: list[str]) -> dict[str, Any]:
    """One checkpoint in ``ls --json``; ``problems`` are what is wrong with it (state "damaged")."""
    return {
        "step": step,
        "path": path,
        "created": _plain(created),
        "created_iso": _iso(created),
        "bytes": _plain(nbytes),
        "metadata": _plain(metadata),
        "state": "damaged" if problems else "ok",
        "problems": problems,
    }


def _reason(e: BaseException) -> str:
    """Why a checkpoint is damaged, on one printable line (an error ckptstore did not name says its type)."""
    text = str(e) if isinstance(e, CkptStoreError) else f"{type(e).__name__}: {e}"
    return _printable(text.replace("\n", " "))


def _locate(args: argparse.Namespace) -> tuple[Storage, str, bool]:
    """The storage and directory name of the checkpoint ``show`` is about, and whether it is a step of a
    store (whose manifest must then name that step)."""

    if args.step is None:
        storage, name = open_parent(args.url, _options(args.option))
        if storage.is_committed(name):
            return storage, name, False
    store = _store(args)
    step = store.latest_step() if args.step is None else args.step
    if step is None:
        raise CkptStoreError(f"no committed checkpoint in {store.url}")
    return store.storage, step_name(step), True


def describe(m: Manifest) -> Iterator[tuple[str, str]]:
    """(key path, description) of every leaf of a checkpoint's tree, from its manifest alone (an empty
    container is a leaf, shown as {} / [] / (); a stateful object is shown, then its state)."""
    for path, node in walk(m.tree):
        t = type(node)
        if t is Stateful:
            yield render_path(path), f"<{_printable(node.type_name)}>"
        elif t is PerRankValues:  # then each rank's value, under its rank
            n = len(node.values)
            yield render_path(path), f"<per rank: {n} rank{'s' * (n != 1)}>"
        elif t is TensorRef:
            if 0 <= node.index < len(m.tensors):
                e = m.tensors[node.index]
                yield render_path(path), f"{e.dtype} {list(e.shape)}"
            else:
                yield render_path(path), f"<missing tensor #{node.index}>"
        elif t is ShardedRef:
            yield render_path(path), f"{node.dtype} {list(node.global_shape)} in {len(node.blocks)} blocks"
        elif t is Scalar:
            try:
                yield render_path(path), f"{node.value()!r}"
            except CkptStoreError as e:
                yield render_path(path), f"<damaged numpy scalar: {e}>"
        elif t is NamedTuple or (t in (dict, list, tuple) and node):
            continue  # a container: its leaves follow
        else:
            yield render_path(path), _safe_repr(node)


def _leaf(m: Manifest, node: Any) -> dict[str, Any]:
    """A leaf of the tree in ``show --json`` (the JSON form of :func:`describe`'s text)."""
    t = type(node)
    if t is Stateful:
        return {"kind": "stateful", "type": node.type_name}
    if t is PerRankValues:
        return {"kind": "per_rank", "ranks": len(node.values)}
    if t is TensorRef:
        if 0 <= node.index < len(m.tensors):
            e = m.tensors[node.index]
            return {"kind": "tensor", "dtype": e.dtype, "shape": _plain(list(e.shape))}
        return {"kind": "tensor", "error": f"missing tensor #{node.index}"}
    if t is ShardedRef:
        shape = _plain(list(node.global_shape))
        return {"kind": "sharded", "dtype": node.dtype, "shape": shape, "blocks": len(node.blocks)}
    if t is Scalar:
        try:
            return {"kind": "scalar", "dtype": node.dtype, "value": _safe_repr(node.value())}
        except CkptStoreError as e:
            return {"kind": "scalar", "dtype": node.dtype, "error": f"damaged numpy scalar: {e}"}
    return {"kind": "value", "value": _plain(node)}


@command("show")
def _show(args: argparse.Namespace) -> int:
    storage, name, in_store = _locate(args)
    m = load.read_manifest(storage, name)
    when, _, meta, problems = _describe_checkpoint(m.created, 0, m.metadata)
    if in_store and name != step_name(m.step):
        problems.insert(0, f"its manifest is that of step {m.step}")
    if args.json:
        try:
            nbytes: Any = sum(f.size for f in m.files)
        except Exception:  # sizes a damaged manifest holds
            nbytes = None
        leaves = []
        for key_path, node in walk(m.tree):
            if type(node) is NamedTuple or (type(node) in (dict, list, tuple) and node):
                continue  # a container: its leaves follow
            leaves.append({"path": render_path(key_path), **_leaf(m, node)})
        _print_json(
            {
                "path": storage.url_of(name),
                "step": _plain(m.step),
                "created": _plain(m.created),
                "created_iso": _iso(m.created),
                "writer": _plain(m.writer),
                "format_version": _plain(m.version),
                "metadata": _plain(m.metadata),
                "state": "damaged" if problems else "ok",
                "problems": problems,
                "files": len(m.files),
                "tensors": len(m.tensors),
                "bytes": _plain(nbytes),
                "leaves": leaves,
            }
        )
        return 1 if problems else 0
    print(_printable(f"# {storage.url_of(name)}  step {m.step}  created {when}"))
    if meta:
        print(_printable(f"# metadata {meta}"))
    if problems:
        print(_printable(f"# DAMAGED: {'; '.join(problems)}"))
    for path, what in describe(m):
        print(_printable(f"{path}  {what}"))
    return 1 if problems else 0


@command("verify")
def _verify(args: argparse.Namespace) -> int:
    from .verify import verify_checkpoint

    targets: list[tuple[Storage, str]] = []
    if args.step is None:
        storage, name = open_parent(args.url, _options(args.option))
        if storage.is_committed(name):  # URL is one checkpoint directory
            targets = [(storage, name)]
    if not targets:
        store = _store(args)
        steps = store.steps() if args.step is None else [args.step]
        if not steps:
            raise CkptStoreError(f"no committed checkpoint in {store.url}")
        targets = [(store.storage, step_name(s)) for s in steps]
    damaged = missing = 0
    for storage, name in targets:
        try:
            with _progress(args, f"verify {name}", leave=False) as shown:  # cleared before the line below
                r = verify_checkpoint(storage, name, progress=shown)
            size = _human(r.nbytes)
        except ConfigError:
            raise  # a bad CKPTSTORE_* setting is no damage of the checkpoint's
        except Exception as e:  # one damaged checkpoint must not hide the others
            if isinstance(e, CkptStoreError) and not storage.is_committed(name):
                if args.step is None:
                    continue  # deleted meanwhile (retention): nothing to verify
                missing += 1  # asked for by step, and not there: nothing is damaged
                print(f"{name}  missing  no committed checkpoint at {_printable(storage.url_of(name))}")
                continue
            damaged += 1
            print(f"{name}  DAMAGED  {_reason(e)}")
            continue
        print(f"{name}  ok  {r.files} files, {r.tensors} tensors, {size}")
    if damaged:
        print(f"ckptstore verify: {damaged} of {len(targets)} checkpoint(s) damaged", file=sys.stderr)
    if missing:
        print(f"ckptstore verify: {missing} of {len(targets)} checkpoint(s) missing", file=sys.stderr)
    return 1 if damaged or missing else 0


def _progress(args: argparse.Namespace, desc: str, *, leave: bool = True) -> Progress:
    """The progress bar of a command: on stderr when it is a terminal, always with --progress, never with
    --no-progress (and never without tqdm)."""
    if args.progress is False:
        return Progress()
    return bar(desc, force=args.progress is True, leave=leave)


# --- export ---------------------------------------------------------------------------------------------


@command("export")
def _export(args: argparse.Namespace) -> int:
    with _progress(args, "export") as shown:
        files = export_hf(
            args.url,
            args.to,
            step=args.step,
            keys=args.keys or None,
            exclude=args.exclude,
            max_shard_size=args.max_shard_size,
            progress=shown,
            storage_options=_options(args.option),
        )
    for path in files:
        print(_printable(f"{path}  {_human(path.stat().st_size)}"))
    return 0


@command("watch")
def _watch(args: argparse.Namespace) -> int:
    from .watch import checkpoints_iterator

    # No pin: the path is printed and left at once, and a watcher needs only read access.
    options = _options(args.option)
    paths = checkpoints_iterator(
        args.url, timeout=args.timeout, storage_options=options, every_checkpoint=args.every, pin=False
    )
    damaged = 0
    try:
        for path in paths:
            print(path, flush=True)  # stdout: paths only, every committed checkpoint, as the iterator yields them
            problem = _check_manifest(path, options)
            if problem is not None:  # marked on stderr, where a script reading the paths does not trip on it
                damaged += 1
                print(f"ckptstore watch: {path}  DAMAGED  {problem}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        return 130
    return 1 if damaged else 0


def _check_manifest(path: str, options: dict[str, Any]) -> str | None:
    """Why the checkpoint at ``path`` cannot be restored, from its manifest alone; None if it reads."""
    try:
        storage, name = open_parent(path, options)
        m = load.read_manifest(storage, name)
    except CheckpointNotFoundError:
        return None  # deleted meanwhile (retention): it was whole while it was there
    except ConfigError:
        raise  # a bad CKPTSTORE_* setting is no damage of the checkpoint's
    except Exception as e:
        return _reason(e)
    problems = _describe_checkpoint(m.created, 0, m.metadata)[3]
    if name != step_name(m.step):  # the watcher yields the steps of a store
        problems.insert(0, f"its manifest is that of step {m.step}")
    return "; ".join(problems) if problems else None


# --- rm and prune: deletions that honour readers' pins (docs: leases.py) --------------------------------


def _pins(storage: Storage) -> dict[int, float]:
    """Steps that a live lease pins, with the latest expiry time of their leases (one listing)."""
    pins = leases.live_pins(leases.LeaseDir(storage).names(), time.time())
    return {step: expiry for name, expiry in pins.items() if (step := parse_step(name)) is not None}


def _pinned_text(pins: dict[int, float], step: int) -> str:
    until = f" (its lease runs until {_time(pins[step])} unless renewed)" if step in pins else ""
    return f"a reader pins it{until}"


@command("rm")
def _rm(args: argparse.Namespace) -> int:
    store = _store(args)
    storage = store.storage
    status = 0
    present: list[int] = []
    for step in dict.fromkeys(args.steps):  # in the order given, once each
        if not 0 <= step < 1 << 63:
            print(f"ckptstore rm: step {step} is not a step (an int in [0, 2**63))", file=sys.stderr)
            status = 1
        elif not storage.is_committed(step_name(step)):
            print(
                f"ckptstore rm: no committed checkpoint at {_printable(storage.url_of(step_name(step)))}",
                file=sys.stderr,
            )
            status = 1
        else:
            present.append(step)
    if not present:
        return status  # (and the store lock is not taken: it would create a store that is not there)
    pins = _pins(storage)
    if args.dry_run or args.force:
        for step in present:
            url = _printable(storage.url_of(step_name(step)))
            if step in pins and not args.force:
                print(f"ckptstore rm: would not delete {url}: {_pinned_text(pins, step)}", file=sys.stderr)
                status = 1
                continue
            forced = " (pinned by a reader: --force)" if step in pins else ""
            if not args.dry_run:
                try:
                    store.delete(step)  # ignores leases: the explicit deletion of the API
                except CheckpointNotFoundError as e:  # deleted meanwhile
                    print(_printable(f"ckptstore rm: {e}"), file=sys.stderr)
                    status = 1
                    continue
            print(f"{'would delete' if args.dry_run else 'deleted'} {url}{forced}")
        return status
    # Marked, then looked at: a reader pinning one of them meanwhile keeps it (the protocol of leases.py).
    with storage.lock():
        deleted = set(delete_unpinned(storage, present))
    for step in present:
        url = _printable(storage.url_of(step_name(step)))
        if step in deleted:
            print(f"deleted {url}")
            continue
        status = 1
        if step in pins or step in _pins(storage):
            why = f"{_pinned_text(pins, step)}; wait until it is released, or pass --force"
        else:
            why = "it could not be deleted (see the warning above)"
        print(f"ckptstore rm: not deleting {url}: {why}", file=sys.stderr)
    return status


@command("prune")
def _prune(args: argparse.Namespace) -> int:
    if args.keep_last is None and args.keep_best is None:
        print(
            "ckptstore prune: give --keep-last or --keep-best (without either, retention keeps everything)",
            file=sys.stderr,
        )
        return 2
    if (args.keep_best is None) != (args.best_metric is None):
        print("ckptstore prune: --keep-best and --best-metric go together", file=sys.stderr)
        return 2
    policy = RetentionPolicy(
        args.keep_last,
        args.keep_every_n_steps,
        args.keep_every_n_hours,
        keep_best=args.keep_best,
        best_metric=args.best_metric,
        best_mode=args.best_mode or "min",
    )
    store = _store(args)
    storage = store.storage
    steps = store.steps()
    if not steps:
        _require_store(store, args)  # a store that is not there is an error; an empty one has nothing to prune
        return 0
    pins = _pins(storage)
    retention = Retention(policy)
    drop = retention.plan(storage)  # pins aside: which are kept for them
    if args.dry_run:
        for step in drop:
            url = _printable(storage.url_of(step_name(step)))
            if step in pins:
                print(f"would keep {url}: {_pinned_text(pins, step)}")
            else:
                print(f"would delete {url}")
        return 0
    deleted = set(retention.apply(storage))  # also removes leftovers of crashed writers, as a save does
    status = 0
    for step in drop:
        url = _printable(storage.url_of(step_name(step)))
        if step in deleted:
            print(f"deleted {url}")
        elif not storage.is_committed(step_name(step)):
            continue  # deleted meanwhile, by another process
        elif step in pins or step in _pins(storage):
            print(f"kept {url}: {_pinned_text(pins, step)}")
        else:
            print(f"ckptstore prune: {url} was not deleted (see the warning above)", file=sys.stderr)
            status = 1
    for step in sorted(deleted - set(drop)):  # a step committed meanwhile, or one read differently above
        print(f"deleted {_printable(storage.url_of(step_name(step)))}")
    return status


# --- the parser ---------------------------------------------------------------------------------------

_EXAMPLES = """\
examples:
  ckptstore ls ckpts/run1                      step, time, size and metadata of each checkpoint
  ckptstore ls ckpts/run1 --json               the same as JSON (with each one's state: ok or damaged)
  ckptstore show ckpts/run1 --step 4000        the tree of one checkpoint
  ckptstore verify ckpts/run1                  check every byte of every checkpoint
  ckptstore export ckpts/run1 --to hf/run1     the latest model as Hugging Face weights (model.safetensors)
  ckptstore watch ckpts/run1 --every           print each new checkpoint's path as it is committed
  ckptstore rm ckpts/run1 1000 2000            delete two checkpoints (a pinned one is refused)
  ckptstore prune ckpts/run1 --keep-last 3 --dry-run   what retention would delete
  ckptstore ls s3://bucket/run1 -o endpoint_url=http://127.0.0.1:9000

exit status: 0 done; 1 a failure, a damaged or missing checkpoint, a refused deletion; 2 bad arguments.
"""

_SUB_EXAMPLES = {
    "ls": """\
examples:
  ckptstore ls ckpts/run1
  ckptstore ls ckpts/run1 --json | jq '.[] | select(.state != "ok") | .step'
  ckptstore ls s3://bucket/run1 -o endpoint_url=http://127.0.0.1:9000 -o anon=true
  ckptstore ls ckpts/run1 --best-metric val_loss --best-mode min

A URL where nothing exists is an error (exit status 1); an existing store without checkpoints lists none.
--json prints a list, one object per checkpoint: step, path, created (seconds since the epoch),
created_iso, bytes, metadata, state ("ok" or "damaged") and problems; with --best-metric also best (true
for one checkpoint at most). Values JSON cannot hold (bytes, tuple keys, nan, ints past 64 bits) are
written as text.

--best-metric NAME marks the checkpoint whose metadata[NAME] is best, as CheckpointStore(...,
best_metric=NAME, best_mode=...).best_step() finds it: the lowest value with --best-mode min (the
default), the highest with max; of equal values the newer step; only ints and floats count (not NaN, not
bools); a damaged checkpoint never. The store root holds no configuration: give the metric here.
""",
    "show": """\
examples:
  ckptstore show ckpts/run1                    the latest checkpoint
  ckptstore show ckpts/run1 --step 4000
  ckptstore show ckpts/final                   one checkpoint directory (ckptstore.save)
  ckptstore show ckpts/run1 --json             path, step, created, metadata, state, files, tensors, bytes,
                                               and each leaf: path, kind, dtype and shape or value
""",
    "verify": """\
examples:
  ckptstore verify ckpts/run1                  every checkpoint
  ckptstore verify ckpts/run1 --step 4000      one: "ok", "DAMAGED" and why, or "missing"
  ckptstore verify ckpts/run1/step_00004000    one checkpoint directory

exit status 1 if a checkpoint is damaged or missing. A progress bar per checkpoint on stderr when it is a
terminal (--progress: always; --no-progress: never).
""",
    "export": """\
examples:
  ckptstore export ckpts/run1 --to hf/run1                the latest step's state["model"]
  ckptstore export ckpts/run1 --step 4000 --keys model --to hf/run1 --max-shard-size 2GB
  ckptstore export ckpts/run1 --to hf/run1 --exclude lm_head.weight   without the tied copy

Writes model.safetensors (metadata {"format": "pt"}), or model-00001-of-0000N.safetensors shards and
model.safetensors.index.json above --max-shard-size (tensor bytes per file: 2GB, 500MiB, or bytes; by
default 5GiB). The names are those of the model's own state_dict(): the key chosen by --keys and the
prefixes of torch.compile (_orig_mod.) and DDP (module.) are left out. DIR must be new or empty; add
config.json (config.save_pretrained(DIR)) and the tokenizer after, and AutoModel*.from_pretrained(DIR)
loads it. Prints each file written. A progress bar on stderr when it is a terminal (--progress: always;
--no-progress: never).
""",
    "watch": """\
examples:
  ckptstore watch ckpts/run1 --every --timeout 600
  ckptstore watch s3://bucket/run1 -o endpoint_url=http://127.0.0.1:9000

stdout: paths only; a damaged checkpoint is marked on stderr (exit status 1 at the end).
""",
    "rm": """\
examples:
  ckptstore rm ckpts/run1 1000                 delete step 1000
  ckptstore rm ckpts/run1 1000 2000 --dry-run  say what would be deleted
  ckptstore rm ckpts/run1 1000 --force         delete it even if a reader pins it

A checkpoint that a reader pins (ckptstore.pin, checkpoints_iterator) is not deleted: rm says so and exits
with status 1; --force deletes it anyway (CheckpointStore.delete: the reader may then fail). A step that is
not committed is an error too; the other steps are still deleted.
""",
    "prune": """\
examples:
  ckptstore prune ckpts/run1 --keep-last 3 --dry-run
  ckptstore prune ckpts/run1 --keep-last 3 --keep-every-n-steps 10000
  ckptstore prune ckpts/run1 --keep-last 2 --keep-best 3 --best-metric val_loss --best-mode min

Applies retention once, as CheckpointStore(URL, max_to_keep=N, keep_every_n_steps=K,
keep_every_n_hours=H, keep_best=B, best_metric=NAME, best_mode=...) does after each save: what survives is
the union of the policies (with --keep-best alone: the best B and the newest); a checkpoint a
reader pins is kept ("kept ...: a reader pins it"); leftovers of crashed writers are removed. Prints each
checkpoint deleted.
""",
}


def _positive(kind: type) -> Callable[[str], Any]:
    """An argparse type: a positive (finite) number of ``kind``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n' if kind is int else ''} {kind.__name__}") from None
        if not 0 < value < math.inf:
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
        return value

    parse.__name__ = kind.__name__  # what argparse names in its own messages
    return parse


def _metadata_key(text: str) -> str:
    """An argparse type: a metadata key (a non-empty name)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty name is no metadata key")
    return text


def _version() -> str:
    from . import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="ckptstore",
        description="Inspect and manage ckptstore checkpoints.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ckptstore {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help,
            description=help[0].upper() + help[1:] + ".",
            epilog=_SUB_EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("url", help="store root (path or fsspec URL)")
        p.add_argument(
            "-o",
            "--option",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="fsspec storage option (repeatable)",
        )
        return p

    as_json = "machine-readable output: JSON on stdout"
    ls = add("ls", "list committed checkpoints")
    ls.add_argument("--json", action="store_true", help=as_json)
    ls.add_argument(
        "--best-metric",
        type=_metadata_key,
        metavar="NAME",
        help='mark the checkpoint whose metadata[NAME] is best (a BEST column; "best" in --json)',
    )
    ls.add_argument(
        "--best-mode", choices=("min", "max"), help="min: the lowest value is best (default); max: the highest"
    )
    show = add("show", "show the tree of a checkpoint")
    show.add_argument("--step", type=int, help="default: the latest")
    show.add_argument("--json", action="store_true", help=as_json)
    verify = add("verify", "check every byte of the checkpoints")
    verify.add_argument("--step", type=int, help="default: every step")
    progress_help = "a progress bar on stderr (default: when stderr is a terminal)"
    verify.add_argument("--progress", action=argparse.BooleanOptionalAction, help=progress_help)
    export = add("export", "write a checkpoint's model as Hugging Face weights (model.safetensors)")
    export.add_argument("--to", required=True, metavar="DIR", help="a new or empty directory")
    export.add_argument("--step", type=int, help="default: the latest")
    export.add_argument(
        "--keys", default="model", help="the subtree holding the model's state dict (default: model; '' for all)"
    )
    export.add_argument("--format", choices=("hf",), default="hf", help="hf: the Hugging Face hub's layout")
    export.add_argument(
        "--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, metavar="SIZE", help="tensor bytes per file (default 5GiB)"
    )
    export.add_argument(
        "--exclude", action="append", default=[], metavar="NAME", help="leave this tensor out (repeatable)"
    )
    export.add_argument("--progress", action=argparse.BooleanOptionalAction, help=progress_help)
    watch = add("watch", "print each new checkpoint's path as it is committed")
    watch.add_argument("--timeout", type=float, help="stop after waiting this many seconds for a new one")
    watch.add_argument("--every", action="store_true", help="every checkpoint in step order, not the newest only")
    rm = add("rm", "delete checkpoints, unless a reader pins them")
    rm.add_argument("steps", nargs="+", type=int, metavar="STEP", help="a step to delete")
    rm.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    rm.add_argument("--force", action="store_true", help="delete pinned checkpoints too")
    prune = add("prune", "apply retention once: delete what the policy drops, unless a reader pins it")
    prune.add_argument("--keep-last", type=_positive(int), metavar="N", help="keep the newest N checkpoints")
    prune.add_argument(
        "--keep-every-n-steps", type=_positive(int), metavar="K", help="also keep every step divisible by K"
    )
    prune.add_argument(
        "--keep-every-n-hours", type=_positive(float), metavar="H", help="also keep one checkpoint per H hours"
    )
    prune.add_argument(
        "--keep-best", type=_positive(int), metavar="N", help="also keep the N best by --best-metric (and the newest)"
    )
    prune.add_argument("--best-metric", metavar="NAME", help="the metadata key that ranks checkpoints")
    prune.add_argument(
        "--best-mode", choices=("min", "max"), help="min: the lowest value is best (default); max: the highest"
    )
    prune.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ckptstore`` console script (and ``python -m ckptstore``); returns the exit
    status."""
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except CkptStoreError as e:
        print(_printable(f"ckptstore {args.command}: {e}"), file=sys.stderr)
        return 1
    except BrokenPipeError:  # `ckptstore show ... | head`
        return 0
    except Exception as e:  # never a traceback for what a store holds: say what failed, exit status 1
        print(_printable(f"ckptstore {args.command}: {_reason(e)}"), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
