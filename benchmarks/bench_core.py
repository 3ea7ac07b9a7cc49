"""Core state figures at 10k presences, printed beside the Phoenix.Tracker.State reference.

Run: ``.venv/bin/python benchmarks/bench_core.py`` (or ``make bench``). It prints figures, never
asserts them: these machines are shared and noisy, so compare medians and ratios.

The reference figures are Phoenix.Tracker.State measured on machines of this size: about 290k
local joins/s, about 530k presences/s merged from one delta at 10k presences, and about 500 bytes
of memory per presence.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import tracemalloc
from collections.abc import Callable

from presence.core.state import State
from presence.core.types import ReplicaId

REFERENCE = {"joins/s": 290_000.0, "merged presences/s": 530_000.0, "bytes/presence": 500.0}
ORIGIN = ReplicaId("origin", 1)
PEER = ReplicaId("peer", 1)


def tracked_state(count: int) -> State:
    state = State(ORIGIN)
    state.replica_up(PEER)
    for i in range(count):
        state.track(f"owner{i % 1000}", f"topic{i % 100}", f"user{i}", {"status": "online"})
    return state


def measure_joins(count: int) -> float:
    start = time.perf_counter()
    tracked_state(count)
    return count / (time.perf_counter() - start)


def measure_merge(count: int) -> float:
    delta = tracked_state(count).take_delta()
    assert delta is not None
    receiver = State(PEER)
    receiver.replica_up(ORIGIN)
    start = time.perf_counter()
    diff = receiver.merge(delta)
    elapsed = time.perf_counter() - start
    assert len(diff.joins) == count
    return count / elapsed


def measure_bytes(count: int) -> float:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    state = tracked_state(count)
    state.take_delta()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / count


def median_of(runs: int, measure: Callable[[int], float], count: int) -> float:
    return statistics.median(measure(count) for _ in range(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presences", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    figures = {
        "joins/s": median_of(args.runs, measure_joins, args.presences),
        "merged presences/s": median_of(args.runs, measure_merge, args.presences),
        "bytes/presence": measure_bytes(args.presences),
    }
    print(f"core state at {args.presences} presences, median of {args.runs} runs")
    print(f"{'figure':<20}{'presence':>14}{'phoenix':>14}{'ratio':>8}")
    for name, value in figures.items():
        reference = REFERENCE[name]
        print(f"{name:<20}{value:>14,.0f}{reference:>14,.0f}{value / reference:>8.2f}")


if __name__ == "__main__":
    main()
