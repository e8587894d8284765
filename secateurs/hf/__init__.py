"""Hugging Face transformers: heads, GQA, head dims, MLP, hidden size and depth pruning applied
to the original ``PreTrainedModel`` (``save_pretrained`` works), meta-device analysis of
large configs, and shard-by-shard application of a plan to safetensors checkpoints."""

from secateurs.hf.prune_hf import (
    KINDS,
    HFAnalysis,
    HFPruneResult,
    analyze_hf,
    apply_hf_plan,
    block_influence,
    drop_blocks,
    prune_hf,
    unit_counts,
)

__all__ = ["KINDS", "HFAnalysis", "HFPruneResult", "analyze_hf", "apply_hf_plan",
           "block_influence", "drop_blocks", "prune_hf", "unit_counts"]
