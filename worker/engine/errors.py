"""Errors the engine raises on purpose: each carries a message a person can act on."""


class EngineError(Exception):
    """Base class: ``str(err)`` is a one-line message meant for the user."""


class InvalidJob(EngineError, ValueError):
    """The request itself is wrong (a bad pattern, a seqlen beyond the model's context...)."""


class ModelNotFound(EngineError):
    """The model id or directory does not exist, or is gated and no token was given."""


class DataError(EngineError):
    """A calibration or evaluation set cannot be read or is too short."""


class JobCancelled(EngineError):
    """``should_cancel()`` returned True; raised between modules and blocks."""
