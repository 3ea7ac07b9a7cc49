"""The asyncio runtime around the core: timers, transport, owners.

``Node`` is the entry point: ``async with Node("n1", listen=..., peers=[...]) as node:``.
"""

from presence.runtime.codec import CodecError, Limits
from presence.runtime.node import InvalidArgument, InvalidMeta, Node, NodeStopped, Subscription
from presence.runtime.transport import Backoff

__all__ = [
    "Backoff",
    "CodecError",
    "InvalidArgument",
    "InvalidMeta",
    "Limits",
    "Node",
    "NodeStopped",
    "Subscription",
]
