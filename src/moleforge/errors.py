"""The exception hierarchy of moleforge.

Every error a user can trigger derives from :class:`MoleforgeError`; messages say what
failed, where (spec path, module name or IR node), what was expected against what was
found, and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "MoleforgeError",
    "SpecError",
    "IRVerificationError",
    "PassError",
    "LoweringError",
    "InjectionError",
    "NotMergeableError",
    "CheckpointError",
    "InputError",
]


class MoleforgeError(Exception):
    """Base class of every error raised by moleforge."""


class SpecError(MoleforgeError, ValueError):
    """An adapter spec is invalid. ``problems`` lists ``(field path, message)`` pairs."""

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.problems = problems or []


class IRVerificationError(MoleforgeError):
    """An IR graph broke one of the verifier's rules; the message holds the printed graph."""


class PassError(MoleforgeError):
    """An optimization pass failed; the message names the pass and the passes before it."""


class LoweringError(MoleforgeError):
    """An IR graph could not be lowered to a backend."""


class InjectionError(MoleforgeError):
    """A spec could not be injected into a model; the model is left as it was."""


class NotMergeableError(MoleforgeError):
    """An adapter part depends on the input and cannot be folded into the frozen weights."""


class CheckpointError(MoleforgeError):
    """A saved adapter does not fit the model it is loaded into, or its files are damaged."""


class InputError(MoleforgeError, ValueError):
    """A model input the adapter reads (``task_ids``) is missing or out of range."""
