"""Errors lens raises with messages meant for users (the CLI and the app show them as they are)."""


class LensError(Exception):
    """Base class: something the user can fix, explained in the message."""


class ModelLoadError(LensError):
    """A model's weights could not be found or loaded."""


class IndexMismatchError(LensError):
    """An index was built with another method, model or dimension than the one asked for."""


class IndexNotFoundError(LensError):
    """No index has been built for a method in a gallery."""


class CorruptIndexError(LensError):
    """An index on disk is damaged (missing file, bad checksum, unreadable manifest)."""
