"""Counts of what the fuzzers ran and reached, printed at the end of the test session.

Each label is also a Hypothesis ``event``, so ``--hypothesis-show-statistics`` shows it per test;
this summary adds the totals across the session and shows which labels were never reached.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from hypothesis import event

EXPECTED_LABELS = (
    "heal while a peer is down",
    "transfer raced a delta",
    "restart while an old message is in flight",
    "an update and a leave in one period",
    "a leave and a rejoin in one period",
    "delivered out of order",
    "partial partition (everyone still reachable some way)",
    "asymmetric link cut",
    "peer went down",
    "peer went permdown",
    "settled and converged",
)


@dataclass
class Statistics:
    histories: int = 0
    steps: int = 0
    labels: Counter[str] = field(default_factory=Counter)
    mutants: dict[str, str] = field(default_factory=dict)

    def report(self) -> list[str]:
        lines = [f"cluster fuzzer: {self.histories} histories, {self.steps} steps"]
        for name in sorted(set(EXPECTED_LABELS) | set(self.labels)):
            lines.append(f"  {self.labels[name]:>7}  {name}")
        missing = [name for name in EXPECTED_LABELS if not self.labels[name]]
        if missing:
            lines.append(f"never reached: {', '.join(missing)}")
        if self.mutants:
            kills = sum(verdict.startswith("killed") for verdict in self.mutants.values())
            lines.append(f"mutants killed: {kills}/{len(self.mutants)}")
            lines.extend(f"  {name:<40} {verdict}" for name, verdict in self.mutants.items())
        return lines


STATISTICS = Statistics()


def label(name: str) -> None:
    event(name)
    STATISTICS.labels[name] += 1
