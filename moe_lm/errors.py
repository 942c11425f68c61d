"""Errors a user can fix. The CLI prints each as one line and exits with status 2.

Anything else that escapes is a bug: the CLI prints it as an unexpected crash and exits 1.
"""

from __future__ import annotations


class MoeLmError(Exception):
    """Base of every error caused by the user's input, with an optional hint on how to fix it."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # one line: the problem, then the fix
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(MoeLmError):
    """A config file, key, type or value that is not allowed."""


class DataError(MoeLmError):
    """Missing, empty, unreadable or inconsistent data (corpus, shards, meta.json, tokenizer)."""


class DatasetUnavailableError(DataError):
    """A Hugging Face dataset that cannot be reached (offline, wrong name, no access)."""


class CheckpointError(MoeLmError):
    """A checkpoint that is missing, truncated, corrupted or from another config."""


class RunError(MoeLmError):
    """A run folder in the wrong state (exists without --resume/--overwrite, no checkpoints...)."""


class TrainingError(MoeLmError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class ExportError(MoeLmError):
    """A model that no target architecture matches exactly."""
