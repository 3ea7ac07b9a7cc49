"""The sans-IO core: pure state machines; no sockets, clocks or random sources."""
