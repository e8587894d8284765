"""Calibration data for the CLI: ``--calibration inputs.npz`` (``.npy`` for one input).

An ``.npz`` holds one array per model input, samples along dim 0, in the model's argument
order (``np.savez(f, x)`` names it ``arr_0``; named arrays keep the order they were saved in).
An array named ``labels`` (or ``--labels-key``) is the targets for gradient criteria and is
not fed to the model. Batches of ``--calibration-batch`` samples are fed in order.

Loss for ``taylor`` / ``fisher``: ``--loss cross_entropy`` (integer labels, the default when
labels are given), ``--loss mse`` (labels shaped like the output), or ``--loss file.py:fn``
with ``fn(output, labels) -> scalar tensor`` (``labels`` is None when the file has none).
"""

from __future__ import annotations

import importlib.util
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from secateurs.errors import InputError

__all__ = ["load_calibration_batches", "make_loss", "LABEL_KEYS"]

LABEL_KEYS = ("labels", "label", "targets", "y")


def _arrays(path: str) -> dict[str, np.ndarray]:
    try:
        if path.lower().endswith(".npy"):
            return {"arr_0": np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                return {"arr_0": np.asarray(data)}
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"--calibration '{path}' is not a readable .npz/.npy file "
                         f"({type(exc).__name__}: {exc}); write it with "
                         "numpy.savez(path, x) (one array per input, samples on dim 0)") from exc


def load_calibration_batches(path: str, batch_size: int = 32, labels_key: str | None = None,
                             example: tuple | None = None
                             ) -> tuple[list[tuple[Any, ...]], list[Any] | None]:
    """Batches (tuples of input tensors) and, if the file has them, label batches."""
    import torch

    if batch_size < 1:
        raise InputError(f"--calibration-batch must be >= 1, got {batch_size}")
    arrays = _arrays(path)
    keys = [labels_key] if labels_key else [k for k in LABEL_KEYS if k in arrays]
    if labels_key and labels_key not in arrays:
        raise InputError(f"--labels-key '{labels_key}' is not in '{path}' (arrays: "
                         f"{sorted(arrays)})")
    label_key = keys[0] if keys else None
    inputs = [(k, a) for k, a in arrays.items() if k != label_key]
    if not inputs:
        raise InputError(f"--calibration '{path}' holds no input arrays (only {sorted(arrays)})")
    n = len(inputs[0][1]) if inputs[0][1].ndim else 0
    for k, a in inputs + ([(label_key, arrays[label_key])] if label_key else []):
        if a.ndim == 0 or len(a) != n or n == 0:
            raise InputError(f"--calibration '{path}': array '{k}' has shape {a.shape}; every "
                             f"array needs the same number of samples ({n}) on dim 0, and at "
                             "least one")
        if a.dtype.kind not in "biuf":
            raise InputError(f"--calibration '{path}': array '{k}' has dtype {a.dtype}; "
                             "use numbers")
    if example is not None and len(example) != len(inputs):
        raise InputError(f"--calibration '{path}' has {len(inputs)} input array(s) "
                         f"({[k for k, _ in inputs]}) but the model takes {len(example)}")
    if example is not None:
        for (k, a), ex in zip(inputs, example):
            if isinstance(ex, torch.Tensor) and tuple(a.shape[1:]) != tuple(ex.shape[1:]):
                raise InputError(f"--calibration '{path}': array '{k}' has samples of shape "
                                 f"{tuple(a.shape[1:])}, the model's example input has "
                                 f"{tuple(ex.shape[1:])}")

    def tensor(a: np.ndarray, like: Any) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        if isinstance(like, torch.Tensor):
            return t.to(like.dtype)
        return t.float() if t.is_floating_point() else t

    examples = example or (None,) * len(inputs)
    batches = [tuple(tensor(a[i:i + batch_size], ex) for (_, a), ex in zip(inputs, examples))
               for i in range(0, n, batch_size)]
    labels = None
    if label_key:
        lab = arrays[label_key]
        labels = [torch.from_numpy(np.ascontiguousarray(lab[i:i + batch_size]))
                  for i in range(0, n, batch_size)]
    return batches, labels


def _load_fn(spec: str) -> Callable[..., Any]:
    path, name = spec.rsplit(":", 1)
    if not Path(path).is_file():
        raise InputError(f"--loss file '{path}' does not exist")
    mod_spec = importlib.util.spec_from_file_location(f"_secateurs_loss_{Path(path).stem}", path)
    if mod_spec is None or mod_spec.loader is None:
        raise InputError(f"--loss '{path}' cannot be imported as a Python module")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[mod_spec.name] = module
    try:
        mod_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - user code: report, don't crash
        raise InputError(f"--loss '{path}' failed to import: {type(exc).__name__}: {exc}") \
            from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise InputError(f"--loss '{path}' has no callable '{name}'")
    return fn


def make_loss(loss: str | None, batches: list[tuple], labels: list[Any] | None
              ) -> Callable[[Any, Any], Any]:
    """``loss_fn(model, batch)`` for the gradient criteria; ``batch`` is one of ``batches``
    (the labels are looked up by the batch's position)."""
    import torch
    import torch.nn.functional as F

    if loss is None:
        if labels is None:
            raise InputError("gradient importance (taylor, fisher) needs a loss: add a "
                             f"'labels' array to the --calibration file (one of {LABEL_KEYS}) "
                             "or pass --loss path/to/file.py:fn (fn(output, labels) -> loss)")
        loss = "cross_entropy"
    index = {id(b): i for i, b in enumerate(batches)}
    if ".py:" in loss:
        fn = _load_fn(loss)
    elif loss in ("cross_entropy", "mse"):
        if labels is None:
            raise InputError(f"--loss {loss} needs labels: add a 'labels' array to the "
                             "--calibration file")

        def fn(output: Any, target: Any) -> Any:
            if loss == "cross_entropy":
                return F.cross_entropy(output, target.long())
            return F.mse_loss(output, target.to(output.dtype))
    else:
        raise InputError(f"--loss '{loss}' is not cross_entropy, mse or path/to/file.py:fn")

    def loss_fn(model: Any, batch: Any) -> Any:
        out = model(*batch)
        if isinstance(out, (tuple, list)):
            out = out[0]
        target = labels[index[id(batch)]] if labels is not None else None
        value = fn(out, target)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise InputError(f"--loss must return a scalar tensor, got {type(value).__name__}")
        return value

    return loss_fn
