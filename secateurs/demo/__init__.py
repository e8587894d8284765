"""The accuracy-retention demo: a small digits CNN, its data, training, evaluation and reports."""

from secateurs.demo.digits import (
    DigitsCNN,
    DigitsSplit,
    evaluate,
    example_input,
    fine_tune,
    latency_ms,
    load_digits_split,
    load_pretrained,
    train,
)
from secateurs.demo.report import ProgressBar, format_table, plot_accuracy_vs_macs

__all__ = [
    "DigitsCNN",
    "DigitsSplit",
    "load_digits_split",
    "train",
    "fine_tune",
    "evaluate",
    "latency_ms",
    "load_pretrained",
    "example_input",
    "plot_accuracy_vs_macs",
    "ProgressBar",
    "format_table",
]
