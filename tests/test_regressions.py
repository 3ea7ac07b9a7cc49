"""Every saved history (fuzzer regressions and the conformance vectors) replays identically
through the model and the implementation, and matches the observations recorded in the file."""

from __future__ import annotations

from pathlib import Path

import pytest

import presence_model.history as mh
from tests.support import replay
from tests.support.regressions import REGRESSIONS

VECTORS = Path(__file__).resolve().parents[1] / "spec" / "vectors"
HISTORIES = sorted(REGRESSIONS.glob("*.json")) + sorted(VECTORS.glob("*.json"))


def test_there_are_histories_to_replay() -> None:
    assert HISTORIES, "no regression or vector files found"


@pytest.mark.parametrize("path", HISTORIES, ids=[p.name for p in HISTORIES])
def test_history_replays(path: Path) -> None:
    history = replay.load(path)
    assert history["format"] == mh.FORMAT
    model_observations = mh.run(history)
    if "expect" in history:
        assert model_observations == history["expect"], "the model no longer agrees with the file"
    impl_observations = replay.run(history)
    for number, (impl_seen, model_seen) in enumerate(
        zip(impl_observations, model_observations, strict=True)
    ):
        assert impl_seen == model_seen, f"step {number}: {history['steps'][number]}"
