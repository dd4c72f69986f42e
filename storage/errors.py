"""The storage package's one error type (its own module, so every storage module can raise it)."""


class StorageError(Exception):
    """A database that cannot be used; the message is one line for the user."""
