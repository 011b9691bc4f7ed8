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
from .errors import CkptStoreError
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
        except CkptStoreError as e:  # one damaged manifest must not hide the other checkpoints
            rows.append((str(step), "?", "?", f"DAMAGED: {e}"))
            status = 1
            continue
        meta = json.dumps(info.metadata, default=repr) if info.metadata else ""
        rows.append((str(step), _time(info.created), _human(info.nbytes), meta))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print(f"{r[0]:>{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip())
    return status


def _locate(args: argparse.Namespace) -> tuple[Storage, str]:
    """The storage and directory name of the checkpoint ``show`` is about."""

    if args.step is None:
        storage, name = open_parent(args.url, _options(args.option))
        if storage.is_committed(name):
            return storage, name
    store = _store(args)
    step = store.latest_step() if args.step is None else args.step
    if step is None:
        raise CkptStoreError(f"no committed checkpoint in {store.url}")
    return store.storage, step_name(step)


def describe(m: Manifest) -> Iterator[tuple[str, str]]:
    """(key path, description) of every leaf of a checkpoint's tree, from its manifest alone (an empty
    container is a leaf, shown as {} / [] / (); a stateful object is shown, then its state)."""
    for path, node in walk(m.tree):
        t = type(node)
        if t is Stateful:
            yield render_path(path), f"<{node.type_name}>"
        elif t is TensorRef:
            if 0 <= node.index < len(m.tensors):
                e = m.tensors[node.index]
                yield render_path(path), f"{e.dtype} {list(e.shape)}"
            else:
                yield render_path(path), f"<missing tensor #{node.index}>"
        elif t is ShardedRef:
            yield render_path(path), f"{node.dtype} {list(node.global_shape)} in {len(node.blocks)} blocks"
        elif t is Scalar:
            yield render_path(path), f"{node.value()!r}"
        elif t is NamedTuple or (t in (dict, list, tuple) and node):
            continue  # a container: its leaves follow
        else:
            yield render_path(path), repr(node)


@command("show")
def _show(args: argparse.Namespace) -> int:
    storage, name = _locate(args)
    m = load.read_manifest(storage, name)
    print(f"# {storage.url_of(name)}  step {m.step}  created {_time(m.created)}")
    if m.metadata:
        print(f"# metadata {json.dumps(m.metadata, default=repr)}")
    for path, what in describe(m):
        print(f"{path}  {what}")
    return 0


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
        except CkptStoreError as e:
            if args.step is None and not storage.is_committed(name):
                continue  # deleted meanwhile (retention): nothing to verify
            damaged += 1
            print(f"{name}  DAMAGED  {e}")
            continue
        print(f"{name}  ok  {r.files} files, {r.tensors} tensors, {_human(r.nbytes)}")
    if damaged:
        print(f"ckptstore verify: {damaged} of {len(targets)} checkpoint(s) damaged", file=sys.stderr)
    return 1 if damaged else 0


@command("watch")
def _watch(args: argparse.Namespace) -> int:
    from .watch import checkpoints_iterator

    # No pin: the path is printed and left at once, and a watcher needs only read access.
    paths = checkpoints_iterator(
        args.url, timeout=args.timeout, storage_options=_options(args.option), every_checkpoint=args.every, pin=False
    )
    try:
        for path in paths:
            print(path, flush=True)
    except KeyboardInterrupt:
        return 130
    return 0


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
        print(f"ckptstore {args.command}: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `ckptstore show ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
