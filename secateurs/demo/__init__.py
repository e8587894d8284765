"""The accuracy-retention demo: a small digits CNN, its data, training and evaluation harness."""

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
]
