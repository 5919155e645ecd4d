"""Exceptions of the evaluation package: each carries one line that says what is wrong and what to do.

``python -m eval`` prints ``error: <message>`` for any ``EvalError`` and exits with status 2, without a
traceback. Anything else escaping the CLI is a bug and keeps its traceback.
"""
from __future__ import annotations

from core.errors import UserError


class EvalError(UserError):
    """Base class: bad input, bad configuration or missing files for an evaluation."""


class WeightsError(EvalError):
    """The Inception weights file is missing, has the wrong hash, or cannot be loaded."""


class ImageInputError(EvalError):
    """Images to score cannot be used: empty folder, unreadable file, wrong size, dtype or shape."""


class ReferenceMismatchError(EvalError):
    """Reference statistics were computed under another protocol (resolution, split, weights, ...)."""
