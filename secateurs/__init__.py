"""secateurs: make trained neural networks smaller and faster.

Public API only; everything else is internal.
"""

from secateurs.errors import InputError, PlanError, SecateursError, TraceError
from secateurs.passes.group_channels import Analysis, ChannelGroup, Member
from secateurs.passes.importance import CRITERIA, ScoreContext
from secateurs.passes.plan import Plan
from secateurs.passes.prune import (
    PruneReport,
    PruneResult,
    analyze,
    apply_plan,
    prune,
    verify_mask_equivalence,
    zero_plan_slices,
)

__all__ = [
    "SecateursError", "TraceError", "PlanError", "InputError",
    "analyze", "prune", "apply_plan", "verify_mask_equivalence", "zero_plan_slices",
    "Plan", "PruneResult", "PruneReport", "Analysis", "ChannelGroup", "Member",
    "CRITERIA", "ScoreContext",
]
__version__ = "0.1.0"
