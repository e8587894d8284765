"""The default demo model: a small residual CNN for scikit-learn's 8x8 ``digits``.

Everything the accuracy-retention demo needs besides pruning itself lives here: the model
(:class:`DigitsCNN`), a deterministic stratified data split (:func:`load_digits_split`),
training and post-pruning fine-tuning (:func:`train`, :func:`fine_tune`), accuracy and
latency measurement (:func:`evaluate`, :func:`latency_ms`) and the shipped weights
(:func:`load_pretrained`).

The dataset ships inside scikit-learn (1797 samples, pixel values 0..16), so nothing is
downloaded. Pixels are scaled to ``[0, 1]`` by ``x / 16``; no other normalisation.

Determinism: a split depends only on ``seed``; training draws its batch order from a private
``torch.Generator`` seeded with ``seed`` and never touches the global RNG, so on CPU two runs
from the same initial weights give bit-identical weights.
"""

from __future__ import annotations

import math
import statistics
import time
from importlib import resources
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from secateurs.demo.report import ProgressBar

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
    "WEIGHTS_RESOURCE",
    "NUM_CLASSES",
]

NUM_CLASSES = 10
WEIGHTS_RESOURCE = ("data", "digits_cnn.pt")
"""Path of the shipped state_dict inside the ``secateurs`` package."""


class DigitsSplit(NamedTuple):
    """One part of the dataset: images ``x`` float ``[N, 1, 8, 8]`` in ``[0, 1]``, labels ``y`` long ``[N]``."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:  # type: ignore[override]
        """Number of samples (not the tuple's arity)."""
        return int(self.y.shape[0])


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + skip(x))``.

    ``skip`` is the identity, or a strided 1x1 conv + BN when the stride or width changes,
    which couples the block's output channels with the downsample conv rather than its input.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class DigitsCNN(nn.Module):
    """A small ResNet for 1x8x8 digits.

    Layout (widths ``(w0, w1, w2)``, default ``(32, 64, 64)``)::

        stem    conv3x3(1->w0) + BN + ReLU            8x8
        layer1  BasicBlock(w0->w0)                    8x8   identity skip
        layer2  BasicBlock(w0->w1, stride 2)          4x4   1x1 conv + BN skip
        layer3  BasicBlock(w1->w2)                    4x4   identity skip (or 1x1 if w1 != w2)
        head    global average pool, flatten, Linear(w2->10)

    With the default widths it has about 151k parameters (a ~0.6 MB state_dict) and traces
    with ``torch.fx.symbolic_trace``.
    """

    def __init__(
        self, widths: tuple[int, int, int] = (32, 64, 64), num_classes: int = NUM_CLASSES
    ) -> None:
        super().__init__()
        w0, w1, w2 = widths
        self.widths = (w0, w1, w2)
        self.conv1 = nn.Conv2d(1, w0, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w0)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = BasicBlock(w0, w0)
        self.layer2 = BasicBlock(w0, w1, stride=2)
        self.layer3 = BasicBlock(w1, w2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w2, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``[N, num_classes]`` for images ``[N, 1, 8, 8]``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def example_input() -> Tensor:
    """A deterministic example batch of one image, shape ``[1, 1, 8, 8]``, values in ``[0, 1]``."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand(1, 1, 8, 8, generator=generator)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def load_digits_split(
    seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2
) -> tuple[DigitsSplit, DigitsSplit, DigitsSplit]:
    """Return ``(train, val, test)`` of scikit-learn's digits, stratified by label.

    The default fractions give a 60/20/20 split (1077/360/360 samples). The split is a pure
    function of the arguments.
    """
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in (0, 1) "
            "and sum to less than 1"
        )
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    index = torch.arange(labels.shape[0]).numpy()
    rest, test = train_test_split(
        index, test_size=test_fraction, random_state=seed, stratify=labels.numpy()
    )
    train_idx, val = train_test_split(
        rest,
        test_size=val_fraction / (1.0 - test_fraction),
        random_state=seed,
        stratify=labels.numpy()[rest],
    )

    def part(idx: object) -> DigitsSplit:
        sel = torch.as_tensor(idx, dtype=torch.long).sort().values
        return DigitsSplit(images[sel].contiguous(), labels[sel].contiguous())

    return part(train_idx), part(val), part(test)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _as_split(data: tuple[Tensor, Tensor]) -> DigitsSplit:
    """Accept any ``(x, y)`` pair and check that it is one."""
    x, y = data
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"data has {x.shape[0]} inputs but {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise ValueError("data is empty")
    return DigitsSplit(x, y)


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """Yield ``steps`` index batches, reshuffling with ``generator`` at each epoch boundary."""
    done = 0
    while done < steps:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            if done == steps:
                return
            yield order[start : start + batch_size]
            done += 1


def _fit(
    model: nn.Module,
    data: tuple[Tensor, Tensor],
    *,
    steps: int,
    lr: float,
    seed: int,
    batch_size: int,
    weight_decay: float,
    progress: bool,
    desc: str,
) -> nn.Module:
    """Minimise cross-entropy with AdamW and a cosine learning-rate schedule, in place."""
    split = _as_split(data)
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with ProgressBar(steps, desc, enabled=progress, force=True) as bar:
        for index in _batches(len(split), batch_size, steps, generator):
            loss = F.cross_entropy(model(split.x[index]), split.y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(postfix=f"loss {loss.item():.4f}")
    model.eval()
    return model


def _steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def train(
    model: nn.Module,
    train_data: tuple[Tensor, Tensor],
    epochs: int = 20,
    lr: float = 3e-3,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
    weight_decay: float = 1e-4,
) -> nn.Module:
    """Train ``model`` in place on ``train_data`` and return it, in eval mode.

    AdamW with a cosine schedule from ``lr`` to 0 over ``epochs`` epochs; the batch order
    comes from a generator seeded with ``seed``. ``progress`` draws a progress bar on stderr.
    """
    if epochs < 1:
        raise ValueError(f"epochs={epochs} must be at least 1")
    n = len(_as_split(train_data))
    return _fit(
        model,
        train_data,
        steps=epochs * _steps_per_epoch(n, batch_size),
        lr=lr,
        seed=seed,
        batch_size=batch_size,
        weight_decay=weight_decay,
        progress=progress,
        desc="train",
    )


def fine_tune(
    model: nn.Module,
    data: tuple[Tensor, Tensor],
    steps: int | None = None,
    epochs: int | None = None,
    lr: float = 1e-3,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
    weight_decay: float = 1e-4,
) -> nn.Module:
    """Recover accuracy after pruning: train ``model`` in place for ``steps`` or ``epochs``.

    Exactly one of ``steps`` and ``epochs`` must be given. Works on any module whose
    forward maps ``[N, 1, 8, 8]`` to logits, including a ``torch.fx.GraphModule``; the learning
    rate is lower than :func:`train`'s so that a pruned model is nudged rather than retrained.
    Returns the model in eval mode.
    """
    if (steps is None) == (epochs is None):
        raise ValueError("fine_tune needs exactly one of steps=... or epochs=...")
    if epochs is not None:
        if epochs < 1:
            raise ValueError(f"epochs={epochs} must be at least 1")
        steps = epochs * _steps_per_epoch(len(_as_split(data)), batch_size)
    assert steps is not None
    return _fit(
        model,
        data,
        steps=steps,
        lr=lr,
        seed=seed,
        batch_size=batch_size,
        weight_decay=weight_decay,
        progress=progress,
        desc="fine-tune",
    )


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def evaluate(model: nn.Module, data: tuple[Tensor, Tensor], batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``data``, in ``[0, 1]``; the model's mode is restored."""
    split = _as_split(data)
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.inference_mode():
            for start in range(0, len(split), batch_size):
                logits = model(split.x[start : start + batch_size])
                correct += int((logits.argmax(dim=1) == split.y[start : start + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / len(split)


def latency_ms(
    model: nn.Module, example: Tensor | None = None, repeats: int = 50, warmup: int = 5
) -> float:
    """Median wall-clock milliseconds of one eval-mode forward pass on ``example``.

    ``example`` defaults to :func:`example_input`. The model's mode is restored.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be at least 1")
    if example is None:
        example = example_input()
    was_training = model.training
    model.eval()
    times: list[float] = []
    try:
        with torch.inference_mode():
            for _ in range(max(warmup, 0)):
                model(example)
            for _ in range(repeats):
                start = time.perf_counter()
                model(example)
                times.append((time.perf_counter() - start) * 1e3)
    finally:
        model.train(was_training)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------
# Shipped weights
# --------------------------------------------------------------------------------------------


def load_pretrained() -> DigitsCNN:
    """Return :class:`DigitsCNN` with the weights shipped in ``secateurs/data``, in eval mode.

    Raises ``FileNotFoundError`` naming the script that regenerates the file if it is missing.
    """
    resource = resources.files("secateurs").joinpath(*WEIGHTS_RESOURCE)
    if not resource.is_file():
        raise FileNotFoundError(
            f"pretrained digits weights not found at {resource}; regenerate them with "
            "`python tools/train_digits.py` (or reinstall secateurs with its package data)"
        )
    with resources.as_file(resource) as path:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model = DigitsCNN()
    model.load_state_dict(state)
    return model.eval()
