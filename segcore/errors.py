"""segcore's errors: one base class, each child also a builtin so callers can catch either.

Every message says what was wrong *and what to change*; the CLI prints it and exits non-zero.
"""

from __future__ import annotations


class SegcoreError(Exception):
    """Base of every error segcore raises on purpose."""

    exit_code = 2


class ConfigError(SegcoreError, ValueError):
    """A parameter or combination of parameters is invalid (tile/halo, unknown model...)."""


class UnknownModelError(ConfigError, KeyError):
    """A model name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class InputError(SegcoreError, ValueError):
    """An input file or URI is missing, unreadable, corrupt or of the wrong kind."""


class CheckpointError(InputError):
    """A checkpoint file is not ours, is tampered with, or does not match its own spec."""


class StorageError(SegcoreError, OSError):
    """Object storage or file-system I/O failed (often transient: retry is sensible)."""

    exit_code = 3


class WorkerLostError(SegcoreError, RuntimeError):
    """A Dask worker running part of a job was lost (killed, preempted, its host gone); what
    was checkpointed survives (retry or resume is sensible)."""

    exit_code = 3


class IncompleteResultError(SegcoreError, RuntimeError):
    """A result exists but is not complete (a crashed or running job)."""


class DataError(InputError):
    """Training/evaluation data is inconsistent (size mismatch, empty folder, bad mask values)."""
