"""Presence: distributed presence tracking."""
