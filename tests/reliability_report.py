"""Run the reliability tests and print the figures docs/reliability.md reports.

    .venv/bin/python -m tests.reliability_report          # all of them (about 3 minutes, S3 on moto included)
    .venv/bin/python -m tests.reliability_report -k local  # extra arguments go to pytest

Each test records what it did with pytest's ``record_property``; this collects and sums them.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from typing import Any

import pytest

FILES = [
    "tests/test_crash_kill.py",
    "tests/test_crash_powerloss.py",
    "tests/test_faults.py",
    "tests/test_concurrency.py",
    "tests/test_verify.py",
    "tests/test_hostile.py",
    "tests/test_fuzz.py",
    "tests/test_reliability_paths.py",
    "tests/test_reliability_retention.py",
    "tests/test_reliability_manifest.py",
    "tests/test_reliability_values.py",
    "tests/test_storage_contract.py",
]


class Tally:
    """A pytest plugin that sums the numbers tests record, and keeps the rest per test."""

    def __init__(self) -> None:
        self.sums: Counter[str] = Counter()
        self.details: dict[str, list[tuple[str, Any]]] = defaultdict(list)
        self.outcomes: Counter[str] = Counter()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" or report.outcome != "passed":
            self.outcomes[report.outcome] += report.when == "call" or report.outcome == "failed"
        if report.when != "call":
            return
        for name, value in report.user_properties:
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.sums[name] += value
            else:
                self.details[name].append((report.nodeid.split("::")[-1], value))


def main(argv: list[str]) -> int:
    tally = Tally()
    code = pytest.main(["-q", "-p", "no:cacheprovider", *FILES, *argv], plugins=[tally])
    s = tally.sums
    print("\n== reliability figures ==")
    print(f"tests: {dict(tally.outcomes)}")
    print(f"SIGKILLs of a writer survived: {s['sigkills_local']} local, {s['sigkills_s3']} S3")
    for name in ("sigkill_phases_local", "sigkill_phases_s3"):
        for _, value in tally.details.get(name, []):
            print(f"  {name.removeprefix('sigkill_phases_')}: landed in {value}")
    print(f"power-cut images checked: {s['power_cut_images']}")
    print(f"fsyncs removed one at a time, each caught: {s['fsyncs_removed_and_caught']} of 5")
    print(
        f"faults injected (ENOSPC, sticky ENOSPC, lost responses; every call of a save + retention): "
        f"{s['faults_injected']}"
    )
    print(f"same-step races between two writer processes (one winner each): {s['same_step_races']}")
    for test, value in tally.details.get("concurrent_outcomes", []):
        print(f"  {test}: {value}")
    print(f"crafted (hostile) checkpoints rejected: {s['hostile_rejected']}")
    print(f"corruptions detected by verify/restore (damage tests): {s['corruptions_detected']}")
    print(f"fuzz mutations: {s['fuzz_mutations']}")
    for _, value in tally.details.get("fuzz_outcomes", []):
        print(f"  reads after a mutation: {value}")
    return int(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
