"""The executable model of Presence: the oracle the implementation is checked against.

Standard library only, no I/O, time given explicitly. See spec/protocol.md for the rules each
function implements.
"""
