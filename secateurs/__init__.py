"""secateurs: make trained neural networks smaller and faster.

Public API only; everything else is internal.
"""

from secateurs.errors import InputError, PlanError, SecateursError, TraceError

__all__ = ["SecateursError", "TraceError", "PlanError", "InputError"]
__version__ = "0.1.0"
