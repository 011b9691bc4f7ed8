"""The trainer + evaluator workflow of examples/ end to end, in real processes: examples/workflow.py starts the
evaluator and the trainer, SIGKILLs the trainer half-way and restarts it. Checked here: the trainer resumes at
the exact iteration and ends bit-identical to an uninterrupted run; the evaluator scores every checkpoint once,
in order, logs each score to TensorBoard at the checkpoint's step, and stops by itself."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

import ckptstore

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ITERATIONS, SAVE, LOG = 200, 20, 10
ARGS = [f"--iterations={ITERATIONS}", f"--save-interval={SAVE}", f"--log-interval={LOG}", "--max-to-keep=5"]


def scalars(logdir: Path, tag: str) -> dict[int, list[float]]:
    """Every value logged under ``tag`` in the event files of ``logdir``, by step (TFRecord framing read by
    hand: 8-byte length, 4-byte CRC, an Event proto, 4-byte CRC)."""
    from tensorboard.compat.proto import event_pb2

    out: dict[int, list[float]] = defaultdict(list)
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack_from("<Q", data, pos)
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                if v.tag == tag:
                    out[event.step].append(v.simple_value)
    return dict(out)


def run(cmd: list[str], tmp_path: Path) -> subprocess.Popen[str]:
    """Run an example as a PyTorch user without TensorFlow does. (TensorFlow is in this environment for the
    TF adapter's tests; where it can be imported, torch's SummaryWriter imports all of it, several seconds
    of CPU per process. A module that fails to import hides it; TensorBoard then uses its own stub.)"""
    hide = tmp_path / "no-tensorflow"
    hide.mkdir(exist_ok=True)
    (hide / "tensorflow.py").write_text("raise ImportError('TensorFlow is hidden from the examples in this test')\n")
    env = {**os.environ, "CKPTSTORE_POLL_INTERVAL_S": "0.05", "PYTHONPATH": str(hide)}
    return subprocess.Popen([sys.executable, *cmd], stdout=subprocess.PIPE, text=True, env=env, cwd=EXAMPLES)


@pytest.mark.slow
def test_train_killed_resumed_and_evaluated(tmp_path: Path) -> None:
    # The same training, never interrupted, to compare with (it runs meanwhile: no evaluator, no delay).
    ref_dir = tmp_path / "reference"
    reference = run(["train.py", f"--ckpt-dir={ref_dir / 'ckpts'}", f"--logdir={ref_dir / 'tb'}", *ARGS], tmp_path)
    workflow = run(["workflow.py", f"--dir={tmp_path / 'run'}", "--delay=0.02", *ARGS], tmp_path)
    out, _ = workflow.communicate(timeout=300)
    assert workflow.returncode == 0, out
    assert reference.wait(300) == 0

    # The trainer was killed between two checkpoints and resumed at the newest one committed.
    killed = re.search(r"trainer killed \(SIGKILL\); committed checkpoints: \[([0-9, ]+)\]", out)
    assert killed, out
    newest_at_kill = max(int(s) for s in killed.group(1).split(","))
    starts = re.findall(r"\[trainer\] starting at iteration (\d+)", out)
    assert starts == ["0", str(newest_at_kill)] and 0 < newest_at_kill < ITERATIONS

    # Exact resume: the final state equals the uninterrupted run's, bit for bit.
    run_dir = tmp_path / "run"
    final = ckptstore.CheckpointStore(run_dir / "ckpts").restore()
    expected = ckptstore.CheckpointStore(ref_dir / "ckpts").restore()
    assert final["iteration"] == expected["iteration"] == ITERATIONS and final["done"] is True
    for key, value in expected["model"].items():
        np.testing.assert_array_equal(final["model"][key], value, err_msg=key)

    # TensorBoard: train/loss at every log step, the same values as the uninterrupted run (steps the killed
    # run logged after its last checkpoint were logged again, identically, after the resume).
    train = scalars(run_dir / "tb" / "train", "train/loss")
    ref_train = scalars(ref_dir / "tb", "train/loss")
    assert sorted(train) == sorted(ref_train) == list(range(LOG, ITERATIONS + 1, LOG))
    for step, values in train.items():
        assert set(values) == set(ref_train[step]), step

    # The evaluator scored every checkpoint once, oldest first, at the checkpoint's step, and stopped.
    evaluated = [int(s) for s in re.findall(r"\[evaluator\] evaluated iteration (\d+)", out)]
    assert evaluated == list(range(SAVE, ITERATIONS + 1, SAVE))
    evals = scalars(run_dir / "tb" / "eval", "eval/loss")
    assert sorted(evals) == evaluated
    assert all(len(v) == 1 and np.isfinite(v[0]) for v in evals.values())
    assert evals[ITERATIONS][0] < evals[SAVE][0]  # the model did learn
