"""Errors the model raises that callers act on. Kept free of torch so the server can catch them
without importing the model."""


class StateError(ValueError):
    """Bytes that are corrupt, of another kind, or written for another model/level config."""
