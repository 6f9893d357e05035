"""User-facing errors. Each one's message is a single line naming the file, the record and the field.

The CLI and the flows catch `InputError` and print `error: <message>` without a traceback:
these are mistakes in what the user handed us, not bugs.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user (file, config, cache); the message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # force a single line


class DatasetError(InputError):
    """A Karpathy-split JSON file is malformed."""


class ConfigError(InputError):
    """A stage config is invalid."""


class CacheError(InputError):
    """A feature cache is missing, incomplete or unreadable."""


class CacheMismatch(CacheError):
    """A cache exists but was made with other weights or another config."""


class CheckpointError(InputError):
    """A checkpoint is unreadable, unsafe or does not match the model/config."""
