"""Failing histories found by the fuzzers, saved as readable history files and replayed forever."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import presence_model.history as mh

REGRESSIONS = Path(__file__).resolve().parents[1] / "regressions"


def save_regression(
    steps: list[dict[str, Any]],
    nodes: Sequence[str],
    config: dict[str, int],
    failure: BaseException,
) -> Path:
    """Write the history (with the model's observations when the model can run it) and return
    its path. The name is a hash of the steps, so the same failure is saved once."""
    history: dict[str, Any] = {
        "format": mh.FORMAT,
        "description": f"found by the fuzzer: {type(failure).__name__}: "
        + (str(failure).strip().splitlines() or [""])[0][:200],
        "nodes": list(nodes),
        "config": config,
        "steps": steps,
    }
    digest = hashlib.sha256(mh.dumps({"steps": steps}).encode()).hexdigest()[:12]
    history["name"] = f"regression-{digest}"
    try:
        history["expect"] = mh.run(history)
    except Exception as model_failure:  # the model itself failed: keep the steps, note why
        history["description"] += f" (the model raised {type(model_failure).__name__})"
    REGRESSIONS.mkdir(exist_ok=True)
    path = REGRESSIONS / f"{history['name']}.json"
    path.write_text(mh.dumps(history), encoding="utf-8")
    return path
