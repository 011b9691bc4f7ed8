"""Every Python example in docs/frameworks.md runs as written (in a fresh namespace, in a temp directory)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import fw_helpers  # noqa: F401  (fixes KERAS_BACKEND and quiets TF before Keras is imported)
from tests.fw_helpers import REPO

DOC = REPO / "docs" / "frameworks.md"


def examples() -> list[tuple[str, str]]:
    """(section title, code) of each ```python block."""
    text = DOC.read_text()
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.S | re.M):
        title = re.findall(r"^## (.+)$", text[: m.start()], flags=re.M)[-1]
        out.append((title, m.group(1)))
    return out


def test_the_doc_has_an_example_per_framework() -> None:
    titles = [t for t, _ in examples()]
    assert titles == [
        "NumPy",
        "PyTorch",
        "JAX and optax",
        "TensorFlow and Keras 3",
        "Across frameworks",
        "Random number generators: `ckptstore.RNGState`",
    ]


@pytest.mark.parametrize(("title", "code"), examples(), ids=[t.split()[0] for t, _ in examples()])
def test_example_runs(title: str, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{DOC}:{title}", "exec"), {"__name__": "__doc_example__"})
