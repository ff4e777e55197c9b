"""Errors the model raises that callers act on. Kept free of torch so the server can catch them
without importing the model."""


class StateError(ValueError):
    """Bytes that are corrupt, of another kind, or written for another model/level config."""


class Interrupted(RuntimeError):
    """A long model call (a consolidation) stopped early because its caller asked it to, e.g. a
    server shutting down; it returned nothing and changed nothing."""
