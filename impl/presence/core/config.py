"""Timing options of a shard, validated once at construction (spec section 8, G5)."""

from __future__ import annotations

from dataclasses import dataclass

from presence.core.types import ConfigError


@dataclass(frozen=True, slots=True)
class Config:
    """All periods are integer milliseconds.

    ``down_period_ms`` of None means ``2 * max_silent_periods * broadcast_period_ms`` (T72).
    """

    broadcast_period_ms: int = 1500
    max_silent_periods: int = 10
    down_period_ms: int | None = None
    permdown_period_ms: int = 1_200_000
    clock_sample_periods: int = 2

    def __post_init__(self) -> None:
        for name in ("broadcast_period_ms", "max_silent_periods", "permdown_period_ms",
                     "clock_sample_periods"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        down = self.down_period_ms
        if down is None:
            object.__setattr__(
                self, "down_period_ms", 2 * self.max_silent_periods * self.broadcast_period_ms
            )
        elif isinstance(down, bool) or not isinstance(down, int) or down < 1:
            raise ConfigError(f"down_period_ms must be a positive integer, got {down!r}")
        idle_interval = self.max_silent_periods * self.broadcast_period_ms
        if self.down_ms <= idle_interval:
            raise ConfigError(
                f"down_period_ms ({self.down_ms}) must exceed the idle heartbeat interval "
                f"max_silent_periods * broadcast_period_ms ({idle_interval}), "
                "or quiet peers would flap between down and up"
            )
        if self.permdown_period_ms <= self.down_ms:
            raise ConfigError(
                f"permdown_period_ms ({self.permdown_period_ms}) must be larger than "
                f"down_period_ms ({self.down_ms})"
            )

    @property
    def down_ms(self) -> int:
        """The effective down period (never None after construction)."""
        assert self.down_period_ms is not None
        return self.down_period_ms
