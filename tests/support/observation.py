"""The observation format: the one thing the model and the implementation are compared on.

A presence is observed as ``(topic, key, owner, meta)`` with ``meta`` a plain dict holding the
refs (spec ID5). Both sides are converted here; neither side imports the other.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import presence_model.state as model
from presence.core import types as impl

Observed = tuple[str, str, str, str]
"""(topic, key, owner, canonical JSON of meta): hashable and totally ordered."""


def canonical(meta: Any) -> str:
    return json.dumps(dict(meta), sort_keys=True, separators=(",", ":"))


def observed_model(presences: Iterable[model.Presence]) -> list[Observed]:
    return sorted((p.topic, p.key, p.owner, canonical(json.loads(p.meta))) for p in presences)


def observed_impl(presences: Iterable[impl.Presence]) -> list[Observed]:
    return sorted((p.topic, p.key, p.owner, canonical(p.meta)) for p in presences)


def diff_model(diff: model.Diff) -> tuple[list[Observed], list[Observed]]:
    return observed_model(diff.joins), observed_model(diff.leaves)


def diff_impl(diff: impl.Diff) -> tuple[list[Observed], list[Observed]]:
    return observed_impl(diff.joins), observed_impl(diff.leaves)
