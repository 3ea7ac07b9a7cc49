"""Presence: distributed presence tracking.

``Node`` is the asyncio runtime (a replica with its TCP mesh); ``presence.core`` is the sans-IO
core it drives, usable on its own with any transport.
"""

from presence.core.config import Config
from presence.core.types import (
    AlreadyTracked,
    ConfigError,
    Diff,
    NotTracked,
    Presence,
    PresenceError,
    ReplicaId,
    Status,
)
from presence.runtime.node import InvalidArgument, InvalidMeta, Node, NodeStopped

__all__ = [
    "AlreadyTracked",
    "Config",
    "ConfigError",
    "Diff",
    "InvalidArgument",
    "InvalidMeta",
    "Node",
    "NodeStopped",
    "NotTracked",
    "Presence",
    "PresenceError",
    "ReplicaId",
    "Status",
]
