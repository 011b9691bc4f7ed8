"""The ``ckptstore`` command: look at stores and checkpoints from a shell.

    ckptstore ls URL                 committed steps: step, time, size, metadata
    ckptstore show URL [--step N]    the tree of one checkpoint: key path, dtype and shape, or value
    ckptstore verify URL [--step N]  check every byte of every checkpoint (or one); exit status 1 if damaged
    ckptstore watch URL [--timeout S] [--every]   print each new checkpoint's path as it is committed

URL is a store root or (for ``show``) one checkpoint directory; ``-o key=value`` passes fsspec storage
options (values are parsed as JSON where they can be: ``-o anon=true``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from . import load
from .errors import CheckpointNotFoundError, CkptStoreError
from .manifest import Manifest
from .skeleton import NamedTuple, Scalar, ShardedRef, Stateful, TensorRef, render_path, walk
from .storage import Storage, open_parent, step_name
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


def _store(args: argparse.Namespace) -> CheckpointStore:
    return CheckpointStore(args.url, storage_options=_options(args.option))


@command("ls")
def _ls(args: argparse.Namespace) -> int:
    store = _store(args)
    rows = [("STEP", "CREATED", "SIZE", "METADATA")]
    status = 0
    for step in store.steps():
        try:
            info = store.info(step)
        except Exception as e:  # one damaged manifest must not hide the other checkpoints
            if isinstance(e, CheckpointNotFoundError) and not store.storage.is_committed(step_name(step)):
                continue  # deleted meanwhile (retention)
            rows.append((str(step), "?", "?", f"DAMAGED: {_reason(e)}"))
            status = 1
            continue
        when, size, meta, problems = _describe_checkpoint(info.created, info.nbytes, info.metadata)
        if info.step != step:
            problems.insert(0, f"its manifest is that of step {info.step}")
        if problems:
            meta = f"DAMAGED: {'; '.join(problems)}" + (f"  {meta}" if meta else "")
            status = 1
        rows.append((str(step), when, size, meta))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        line = f"{r[0]:>{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip()
        print(_printable(line))
    return status


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


@command("show")
def _show(args: argparse.Namespace) -> int:
    storage, name, in_store = _locate(args)
    m = load.read_manifest(storage, name)
    when, _, meta, problems = _describe_checkpoint(m.created, 0, m.metadata)
    if in_store and name != step_name(m.step):
        problems.insert(0, f"its manifest is that of step {m.step}")
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
    damaged = 0
    for storage, name in targets:
        try:
            r = verify_checkpoint(storage, name)
            size = _human(r.nbytes)
        except Exception as e:  # one damaged checkpoint must not hide the others
            if isinstance(e, CkptStoreError) and args.step is None and not storage.is_committed(name):
                continue  # deleted meanwhile (retention): nothing to verify
            damaged += 1
            print(f"{name}  DAMAGED  {_reason(e)}")
            continue
        print(f"{name}  ok  {r.files} files, {r.tensors} tensors, {size}")
    if damaged:
        print(f"ckptstore verify: {damaged} of {len(targets)} checkpoint(s) damaged", file=sys.stderr)
    return 1 if damaged else 0


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
    except Exception as e:
        return _reason(e)
    problems = _describe_checkpoint(m.created, 0, m.metadata)[3]
    if name != step_name(m.step):  # the watcher yields the steps of a store
        problems.insert(0, f"its manifest is that of step {m.step}")
    return "; ".join(problems) if problems else None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="ckptstore", description="Inspect ckptstore checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
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

    add("ls", "list committed checkpoints")
    add("show", "show the tree of a checkpoint").add_argument("--step", type=int, help="default: the latest")
    add("verify", "check every byte of the checkpoints").add_argument("--step", type=int, help="default: every step")
    watch = add("watch", "print each new checkpoint's path as it is committed")
    watch.add_argument("--timeout", type=float, help="stop after waiting this many seconds for a new one")
    watch.add_argument("--every", action="store_true", help="every checkpoint in step order, not the newest only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ckptstore`` console script; returns the exit status."""
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
