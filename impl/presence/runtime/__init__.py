"""The asyncio runtime around the core: timers, transport, owners."""
