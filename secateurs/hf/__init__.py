"""Hugging Face transformers: heads, GQA, head dims, MLP, hidden size and depth pruning applied
to the original ``PreTrainedModel`` (``save_pretrained`` works; ``from_pretrained_pruned``
reloads what a config cannot describe), least-squares recovery of the output projections,
meta-device analysis of large configs, and shard-by-shard application of a plan to
safetensors checkpoints."""

from secateurs.hf.prune_hf import (
    KINDS,
    HFAnalysis,
    HFPruneResult,
    analyze_hf,
    apply_hf_plan,
    block_influence,
    drop_blocks,
    from_pretrained_pruned,
    prune_hf,
    unit_counts,
)
from secateurs.hf.recovery import RecoveryReport, refit_output_projections

__all__ = ["KINDS", "HFAnalysis", "HFPruneResult", "RecoveryReport", "analyze_hf",
           "apply_hf_plan", "block_influence", "drop_blocks", "from_pretrained_pruned",
           "prune_hf", "refit_output_projections", "unit_counts"]
