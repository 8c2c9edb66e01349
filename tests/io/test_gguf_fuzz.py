"""Mutated GGUF headers (tests/gguf_fuzz.py): each case a valid load or a JaxquantError, within its
time limit, in a guarded worker process; 500 cases here, 10,000 in the slow suite."""

from __future__ import annotations

import gguf_fuzz
import pytest


def _check(report: gguf_fuzz.Report, n: int) -> None:
    print(f"{n} cases in {report.seconds:.1f} s: " + ", ".join(f"{k} {v}" for k, v in report.counts.most_common()))
    assert sum(report.counts.values()) == n
    assert report.counts["loads"] > 0 and report.counts["error FileFormatError"] > 0  # both outcomes occur
    assert not report.failures, "\n".join(f"case {i}: {what} (replay: python tests/gguf_fuzz.py replay {i})"
                                          for i, what in report.failures)


def test_500_mutated_headers():
    _check(gguf_fuzz.run(range(500)), 500)


@pytest.mark.slow
def test_10000_mutated_headers():
    _check(gguf_fuzz.run(range(500, 10_500)), 10_000)
