"""ckptstore.progress: the byte counter, its sinks (nothing, a function, a tqdm bar), and its use by verify
and the CLI (a bar only on a terminal: checked in a subprocess without one, and under a pseudo-terminal)."""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import ckptstore
from ckptstore import knobs
from ckptstore.errors import ConfigError, CorruptCheckpointError
from ckptstore.progress import Progress, bar, scope
from ckptstore.storage import step_name
from ckptstore.verify import verify_checkpoint
from tests.conftest import Location

PYTHON = str(Path(sys.executable))


def run_in_pty(argv: list[str], timeout: float = 120) -> tuple[int, str]:
    """Run ``argv`` with stdin, stdout and stderr on a pseudo-terminal of 80x24; its exit status and all it
    wrote (stdout and stderr together, as a terminal shows them)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every holder of the terminal's other end has closed it
                    break
                if not data:
                    break
                out += data
            elif proc.poll() is not None:
                break
        status = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return status, out.decode(errors="replace")


# --- the counter --------------------------------------------------------------------------------------


def test_advance_from_many_threads_counts_every_byte_in_order() -> None:
    seen: list[tuple[int, int]] = []
    p = Progress(8 * 1000 * 3, lambda done, total: seen.append((done, total)))
    barrier = threading.Barrier(8)

    def work() -> None:
        barrier.wait()
        for _ in range(1000):
            p.advance(3)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert p.done == p.total == 24000
    assert len(seen) == 8000
    assert [d for d, _ in seen] == list(range(3, 24001, 3))  # one call at a time, done growing by each advance
    assert seen[-1] == (24000, 24000)


def test_scope_kinds() -> None:
    calls: list[tuple[int, int]] = []
    with scope(lambda d, t: calls.append((d, t)), 10, "x") as p:
        p.advance(4)
        p.advance(0)  # nothing done: no call
        p.advance(6)
    assert calls == [(4, 10), (10, 10)]
    p.advance(5)  # closed: counted, not reported
    assert calls == [(4, 10), (10, 10)] and p.done == 15

    for off in (None, False):
        with scope(off, 10, "x") as q:
            q.advance(10)
        assert q.done == 10 and not q.shown

    outer = Progress(5, lambda d, t: calls.append((d, t)))
    with scope(outer, 7, "x") as inner:  # a caller's counter: the total grows, and it stays open
        assert inner is outer and outer.total == 12
        inner.advance(7)
    outer.advance(5)
    assert calls[-2:] == [(7, 12), (12, 12)]
    outer.close()

    with pytest.raises(ConfigError, match="progress must be"), scope("yes", 1, "x"):  # type: ignore[arg-type]
        pass


def test_bar_only_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    # Under pytest stderr is captured: no terminal, so True shows nothing.
    with scope(True, 100, "quiet") as p:
        p.advance(100)
        assert not p.shown
    assert capsys.readouterr().err == ""
    # Forced (the CLI's --progress), tqdm draws on stderr whatever it is.
    with bar("forced", 2048, force=True) as p:
        assert p.shown
        p.advance(2048)
    err = capsys.readouterr().err
    assert "forced" in err and "100%" in err and "2.00k" in err  # bytes, counted in KiB


def test_without_tqdm_true_degrades_to_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` raises ImportError, as when not installed
    with caplog.at_level(logging.DEBUG, logger="ckptstore.progress"), bar("x", 10, force=True) as p:
        p.advance(10)
        assert not p.shown and p.done == 10
    assert "tqdm is not installed" in caplog.text
    assert capsys.readouterr().err == ""


def test_importing_ckptstore_imports_no_tqdm() -> None:
    code = (
        "import sys, ckptstore, ckptstore.progress, ckptstore.export, ckptstore.cli\n"
        "print(sorted(m for m in ('tqdm', 'torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


# --- verify ---------------------------------------------------------------------------------------------


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """A store of two checkpoints, each of several tensor files."""
    root = tmp_path / "run"
    store = ckptstore.CheckpointStore(root)
    rng = np.random.default_rng(0)
    with knobs.override(max_file_bytes=3000):
        for step in (1, 2):
            store.save(step, {"w": [rng.standard_normal(300).astype(np.float32) for _ in range(4)], "step": step})
    return root


def test_verify_reports_every_byte_of_the_files(store_dir: Path) -> None:
    store = ckptstore.CheckpointStore(store_dir)
    calls: list[tuple[int, int]] = []
    r = verify_checkpoint(store.storage, step_name(2), progress=lambda d, t: calls.append((d, t)))
    sizes = [p.stat().st_size for p in (store_dir / step_name(2)).glob("*.safetensors")]
    assert r.files == len(sizes) > 1
    assert calls[-1] == (sum(sizes), sum(sizes)) == (r.nbytes, r.nbytes)
    assert all(a[0] < b[0] for a, b in itertools.pairwise(calls))
    assert len(calls) == r.files + r.tensors  # each file's header, then each tensor


def test_verify_of_a_damaged_file_stops_the_count(store_dir: Path) -> None:
    target = sorted((store_dir / step_name(1)).glob("*.safetensors"))[-1]
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    store = ckptstore.CheckpointStore(store_dir)
    with Progress() as p:
        with pytest.raises(CorruptCheckpointError, match=r"checksum|xxh3"):
            verify_checkpoint(store.storage, step_name(1), progress=p)
        assert 0 < p.done < p.total  # what was checked before the damage, and no more


# --- the CLI ------------------------------------------------------------------------------------------


def test_cli_verify_shows_no_bar_without_a_terminal(store_dir: Path) -> None:
    done = subprocess.run(
        [PYTHON, "-m", "ckptstore", "verify", str(store_dir)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.count(" ok ") == 2 and "\r" not in done.stdout


def test_cli_verify_shows_a_bar_on_a_terminal(store_dir: Path) -> None:
    status, shown = run_in_pty([PYTHON, "-m", "ckptstore", "verify", str(store_dir)])
    assert status == 0, shown
    assert "verify step_00000001" in shown and "verify step_00000002" in shown  # one bar per checkpoint
    assert "%|" in shown
    assert "step_00000002  ok" in shown
    # --no-progress: the same lines, no bar.
    status, plain = run_in_pty([PYTHON, "-m", "ckptstore", "verify", str(store_dir), "--no-progress"])
    assert status == 0 and "verify step_" not in plain and "%|" not in plain and "step_00000002  ok" in plain


# --- restore -------------------------------------------------------------------------------------------


class Calls:
    """A progress function that records its calls (from any thread: they come one at a time)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))

    def check_complete(self, nbytes: int) -> None:
        assert self.calls, "no progress reported"
        assert self.calls[-1] == (nbytes, nbytes)
        dones = [d for d, _ in self.calls]
        assert dones == sorted(dones)


def test_restore_reports_every_tensor_byte(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    state = {"a": rng.random((100, 300)), "b": [rng.random(7) for _ in range(50)], "step": 3}
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, state)
    nbytes = 100 * 300 * 8 + 50 * 7 * 8
    for mmap in (False, True):
        calls = Calls()
        with knobs.override(chunk_bytes=4096):
            store.restore(progress=calls, mmap=mmap)
        calls.check_complete(nbytes)
    calls = Calls()
    store.restore(keys="b", progress=calls)  # only what is read is counted
    calls.check_complete(50 * 7 * 8)
    calls = Calls()
    assert ckptstore.restore(Path(store.url) / step_name(1), progress=calls)["step"] == 3
    calls.check_complete(nbytes)
    calls = Calls()
    store.verify(1, progress=calls)
    assert calls.calls[-1][0] == calls.calls[-1][1] > nbytes  # the files: headers included


def test_restore_in_place_reports_every_byte(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from ckptstore.frameworks import torch as torch_fw

    m = torch.nn.Linear(100, 50)
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, {"model": m})
    nbytes = sum(t.nbytes for t in m.state_dict().values())
    calls = Calls()
    store.restore(like={"model": torch.nn.Linear(100, 50)}, progress=calls)
    calls.check_complete(nbytes)
    # through the bounce buffer (as into a GPU's tensors)
    real = torch_fw.TorchAdapter.fill_view
    calls = Calls()
    try:
        torch_fw.TorchAdapter.fill_view = lambda self, x, d, s: (  # type: ignore[method-assign]
            None if real(self, x, d, s) is None else self.device_target(x)
        )
        with knobs.override(bounce_bytes=1024):
            store.restore(like={"model": torch.nn.Linear(100, 50)}, progress=calls)
    finally:
        torch_fw.TorchAdapter.fill_view = real  # type: ignore[method-assign]
    calls.check_complete(nbytes)


def test_restore_from_s3_reports_every_byte(s3_url: Location) -> None:
    torch = pytest.importorskip("torch")
    store = ckptstore.CheckpointStore(s3_url.url, storage_options=s3_url.storage_options)
    m = torch.nn.Linear(64, 32)
    store.save(1, {"model": m, "extra": np.arange(1000.0)})
    with knobs.override(read_part_bytes=1024):
        calls = Calls()
        store.restore(progress=calls)
        calls.check_complete(sum(t.nbytes for t in m.state_dict().values()) + 8000)
        calls = Calls()
        store.restore(like={"model": torch.nn.Linear(64, 32), "extra": None}, progress=calls)
        calls.check_complete(sum(t.nbytes for t in m.state_dict().values()) + 8000)
