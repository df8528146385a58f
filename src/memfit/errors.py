"""memfit's exception base. Every error memfit raises on purpose derives from it."""

__all__ = ["MemfitError", "UsageError"]


class MemfitError(Exception):
    """Base class of memfit's own errors; the CLI prints these as one line."""


class UsageError(MemfitError, ValueError):
    """A bad value from the user: the message names it and the valid forms."""
