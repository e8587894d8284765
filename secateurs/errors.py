"""Errors secateurs raises at its boundaries.

Every message names the node, parameter or input at fault and says what to do about it.
"""

from __future__ import annotations

__all__ = ["SecateursError", "TraceError", "PlanError", "InputError"]


class SecateursError(Exception):
    """Base class for every error secateurs raises on bad input."""


class TraceError(SecateursError):
    """The model could not be traced into a channel graph."""


class PlanError(SecateursError):
    """A pruning plan does not fit the model it is applied to."""


class InputError(SecateursError, ValueError):
    """An argument is out of range or names something that does not exist."""
