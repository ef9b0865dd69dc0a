"""The engine's exception hierarchy: every error the engine raises on purpose is an EngineError."""

from __future__ import annotations


class EngineError(Exception):
    """Root of every error the engine raises on purpose."""


class SpecError(EngineError, ValueError):
    """The user asked for something invalid; the message says, in one line, what to change."""


class JobNotFoundError(SpecError):
    """No job with the given id exists in the store."""


class JobExistsError(SpecError):
    """A job with the given id already exists in the store."""


class JobFailedError(EngineError):
    """A job stopped because too many evaluations failed or a stage failed for good."""


class TransientError(EngineError):
    """An error worth retrying (lost worker, dropped connection); stages retry these with backoff."""
