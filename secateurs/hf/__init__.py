"""Hugging Face transformers: heads, GQA, head dims, MLP, hidden size and depth pruning applied
to the original ``PreTrainedModel``, a per-kind report of what was asked and removed (and why
not), a checked ``save_pretrained`` whose output ``from_pretrained_pruned`` reloads identically
(or that refuses), least-squares recovery of the output projections, meta-device analysis of
large configs, and shard-by-shard application of a plan to safetensors checkpoints.

Modules: ``layout`` (where things are), ``classify`` (analysis, unit kinds), ``criteria``
(data-driven importance), ``select``, ``rotary`` (head dims: scale and frequencies),
``apply`` (plan -> module, config), ``loader`` (record, checked save, reload), ``prune_hf``
(the entry point and report), ``scale`` (layer replication), ``shards``, ``recovery``."""

from secateurs.hf.apply import apply_hf_plan, block_influence, drop_blocks
from secateurs.hf.classify import KINDS, HFAnalysis, analyze_hf, unit_counts
from secateurs.hf.loader import RoundTripError, from_pretrained_pruned, save_pretrained
from secateurs.hf.prune_hf import HFPruneResult, KindReport, PruneShortfall, prune_hf
from secateurs.hf.recovery import RecoveryReport, refit_output_projections

__all__ = ["KINDS", "HFAnalysis", "HFPruneResult", "KindReport", "PruneShortfall",
           "RecoveryReport", "RoundTripError", "analyze_hf", "apply_hf_plan",
           "block_influence", "drop_blocks", "from_pretrained_pruned", "prune_hf",
           "refit_output_projections", "save_pretrained", "unit_counts"]
