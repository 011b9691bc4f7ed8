"""The runnable examples of docs/integrations.md: each integration's test runs the first ```python block
of its section, as a reader would paste it."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"


def integrations_example(heading: str) -> str:
    """The first ```python block under ``## heading`` (and before the next ``## ``)."""
    text = DOC.read_text()
    section = text[text.index(f"\n## {heading}\n") + 1 :]
    end = section.find("\n## ")
    section = section if end < 0 else section[:end]
    m = re.search(r"^```python\n(.*?)^```$", section, flags=re.S | re.M)
    assert m is not None, f"{DOC.name}: no python example under ## {heading}"
    return m.group(1)


def run_integrations_example(heading: str) -> None:
    """Run the example of ``## heading`` in the current directory, as a script of its own."""
    exec(compile(integrations_example(heading), f"{DOC}:{heading}", "exec"), {"__name__": "__doc_example__"})
