"""Long fuzzing runs for a scheduled job: ``make fuzz`` (``FUZZ_SECONDS`` bounds it).

Runs both stateful fuzzers round after round with fresh random seeds until the time is spent,
keeping Hypothesis's example database in ``.hypothesis/`` so failures found earlier are tried
first. A failure of the cluster fuzzer is saved, shrunk, under ``tests/regressions/`` (commit
it); the run stops at the first failure and exits non-zero.
"""

from __future__ import annotations

import argparse
import sys
import time

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.stateful import run_state_machine_as_test

from tests.stateful import test_protocol_vs_model, test_state_vs_model
from tests.support.statistics import STATISTICS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--examples-per-round", type=int, default=500)
    args = parser.parse_args()
    settings.register_profile(
        "fuzz",
        max_examples=args.examples_per_round,
        deadline=None,
        database=DirectoryBasedExampleDatabase(".hypothesis/examples"),
        suppress_health_check=list(HealthCheck),
        stateful_step_count=80,
    )
    settings.load_profile("fuzz")
    deadline = time.monotonic() + args.seconds
    rounds = 0
    try:
        while time.monotonic() < deadline:
            rounds += 1
            run_state_machine_as_test(test_state_vs_model.StateMachine)
            test_protocol_vs_model.test_protocol_vs_model()
            print(f"round {rounds}: " + STATISTICS.report()[0], flush=True)
    except Exception as failure:
        print(f"round {rounds} failed: {failure}", file=sys.stderr)
        for note in getattr(failure, "__notes__", []):
            print(note, file=sys.stderr)
        return 1
    print("\n".join(STATISTICS.report()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
