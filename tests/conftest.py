"""Hypothesis profiles and the fuzzer statistics summary.

Profiles: ``default`` for local runs, ``ci`` for the test command (bounded, and not derandomized, so
every CI run explores new histories), ``deep`` for open-ended runs stopped by hand (``make fuzz``
is the time-bounded one). Choose
with ``--hypothesis-profile``.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings

from tests.support.statistics import STATISTICS

settings.register_profile(
    "ci",
    max_examples=300,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "deep",
    max_examples=1_000_000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if STATISTICS.histories or STATISTICS.mutants:
        terminalreporter.section("fuzzer statistics")
        for line in STATISTICS.report():
            terminalreporter.write_line(line)
