"""secateurs: make trained neural networks smaller and faster.

Public API only; everything else is internal. Names that need an optional extra (``onnx``,
``onnxruntime``, ``transformers``, ``tensorrt``) are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from secateurs.errors import InputError, PlanError, SecateursError, TraceError
from secateurs.passes.group_channels import Analysis, ChannelGroup, Member
from secateurs.passes.importance import CRITERIA, ScoreContext, bn_l1_regularizer
from secateurs.passes.permute_nm import PermuteResult, permute_for_nm
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
from secateurs.passes.repair import Repair
from secateurs.passes.schedule import (
    iterative_prune,
    prune_depth,
    prune_to_macs,
    ratios_from_sensitivity,
    sensitivity_scan,
)
from secateurs.passes.sparsify import SparsifyResult, is_nm_sparse, sparsify

_LAZY = {
    "analyze_onnx": "secateurs.passes.prune_onnx",
    "prune_onnx": "secateurs.passes.prune_onnx",
    "sparsify_onnx": "secateurs.passes.onnx_sparsify",
    "export_onnx": "secateurs.runtime.onnx_export",
    "optimize": "secateurs.passes.optimize",
    "quantize_onnx": "secateurs.passes.quantize",
    "OrtSession": "secateurs.runtime.ort",
    "compare": "secateurs.runtime.ort",
    "check_sparse_eligibility": "secateurs.runtime.tensorrt",
    "trtexec_command": "secateurs.runtime.tensorrt",
    "build_engine": "secateurs.runtime.tensorrt",
    "prune_hf": "secateurs.hf",
    "analyze_hf": "secateurs.hf",
    "secateurs_backend": "secateurs.runtime.torch_backend",
}

__all__ = [
    "SecateursError", "TraceError", "PlanError", "InputError",
    "analyze", "prune", "apply_plan", "verify_mask_equivalence", "zero_plan_slices",
    "Plan", "PruneResult", "PruneReport", "Repair", "Analysis", "ChannelGroup", "Member",
    "CRITERIA", "ScoreContext", "bn_l1_regularizer",
    "prune_to_macs", "iterative_prune", "sensitivity_scan", "ratios_from_sensitivity",
    "prune_depth",
    "sparsify", "SparsifyResult", "is_nm_sparse", "permute_for_nm", "PermuteResult",
    *_LAZY,
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "hf":  # the Hugging Face layer, imported on first use (needs transformers)
        return importlib.import_module("secateurs.hf")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'secateurs' has no attribute '{name}'")
