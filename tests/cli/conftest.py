"""The CLI suite's fixture: a directory with a model spec, a small ONNX model and calibration
data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ._helpers import SPEC, mlp_onnx


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A directory with a model spec file, a small ONNX model and calibration data."""
    (tmp_path / "model.py").write_text(SPEC)
    mlp_onnx(tmp_path / "mlp.onnx")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "cal.npz", x=rng.standard_normal((24, 8)).astype(np.float32),
             labels=rng.integers(0, 4, 24))
    return tmp_path
