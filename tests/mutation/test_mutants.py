"""The CI-profile fuzzers must kill every mutant of the core (tests/mutation/mutants.py).

Each mutant is swapped in for the harness and both stateful machines run against it, with the
example budget of the active profile, derandomized and without shrinking (a kill needs one
failure, not the smallest). A surviving mutant fails this test: the fuzzers could not tell a
broken core from the real one.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

import tests.stateful.test_protocol_vs_model as protocol_test
import tests.stateful.test_state_vs_model as state_test
import tests.support.impl_cluster as impl_cluster
from presence.core import shard as shard_module
from tests.mutation.mutants import MUTANTS, Mutant
from tests.support.statistics import STATISTICS


def hunting_settings() -> settings:
    return settings(
        settings.default,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        deadline=None,
        stateful_step_count=50,
        suppress_health_check=list(HealthCheck),
    )


def killed(machine: type) -> bool:
    # Hunting runs are not fuzzing runs: keep them out of the session's fuzzer statistics.
    saved = (STATISTICS.histories, STATISTICS.steps, Counter(STATISTICS.labels))
    try:
        run_state_machine_as_test(machine, settings=hunting_settings())
    except Exception:
        return True
    finally:
        STATISTICS.histories, STATISTICS.steps, STATISTICS.labels = saved
    return False


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_fuzzers_kill_the_mutant(mutant: Mutant, monkeypatch: pytest.MonkeyPatch) -> None:
    mutated = mutant.build()
    if mutant.module == "state":
        monkeypatch.setattr(shard_module, "State", mutated.State)
        monkeypatch.setattr(state_test, "State", mutated.State)
    else:
        monkeypatch.setattr(impl_cluster, "Shard", mutated.Shard)
    # The regression saver would file the mutant's failures as real bugs: keep it out.
    monkeypatch.setattr(protocol_test, "save_regression", lambda *args: "(not saved)")
    start = time.perf_counter()
    machines = [protocol_test.ProtocolMachine]
    if mutant.module == "state":
        machines.insert(0, state_test.StateMachine)
    verdict = "killed" if any(killed(machine) for machine in machines) else "SURVIVED"
    STATISTICS.mutants[mutant.name] = f"{verdict} in {time.perf_counter() - start:.1f} s"
    assert verdict == "killed", f"mutant survived: {mutant.breaks}"


def test_the_real_core_is_not_a_mutant() -> None:
    """The harness swap itself must not break anything: the unmutated machines pass."""
    assert not killed(state_test.StateMachine)
    assert not killed(protocol_test.ProtocolMachine)
