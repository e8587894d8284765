"""Every zoo model, exported by both exporters, static and with a dynamic batch: the pruned
model passes ``check_model(full_check=True)``, runs under ONNX Runtime and is mask-equivalent
(the original with the plan's slices zeroed gives the same outputs) at batch 1, 2 and 5; a
dynamic batch stays declared and runs at every size.

The default run covers every zoo model with the TorchScript exporter and a representative set
(every op family) with the dynamo exporter; ``-m slow`` runs the whole matrix."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from _onnx_testlib import export_matrix, input_dims

from secateurs import zoo
from secateurs.passes.prune_onnx import prune_onnx, verify_onnx

BATCHES = (1, 2, 5)
MODELS = [n for n in zoo.names() if "bench" not in zoo.get(n).tags]
# Models whose exact groups all feed a LayerNorm or a pinned output: nothing to remove.
NOTHING_TO_REMOVE = {"mlp", "untraceable_cond", "eca_channel_conv", "gmlp_sgu"}
# Dynamo exports in the default run (a dynamo export takes 3-30 s, so the rest are slow
# tests): conv + GroupNorm + ConvTranspose + upsample + concat + squeeze-excite
# (groupnorm_cnn), SDPA + fused qkv + LayerNorm (vit_sdpa), Llama
# (RMSNorm, GQA, rotary, embedding) with a dynamic batch (nn.MultiheadAttention: TorchScript
# here, dynamo under slow); BatchNorm + depthwise + grouped conv +
# channel split/shuffle (shufflenet) static.
DYNAMO_DEFAULT = ["groupnorm_cnn", "vit_sdpa", "llama"]
DYNAMO_STATIC_DEFAULT = ["shufflenet"]


def _feeds(model: onnx.ModelProto, inputs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    return {n: t.numpy() for n, t in zip(names, inputs)}


def _check(name: str, exporter: str, dynamic: bool, batches: tuple[int, ...]) -> None:
    from _onnx_testlib import batched_inputs

    torch.set_num_threads(1)
    at = 2 if dynamic else batches[0]
    original, inputs = export_matrix(name, exporter, at, dynamic)
    shapes = {n: list(a.shape) for n, a in _feeds(original, inputs).items()}
    before = original.SerializeToString()
    result = prune_onnx(original, ratio=0.5, round_to=1, input_shapes=shapes if dynamic else None)
    assert original.SerializeToString() == before, "the input model was modified"
    assert not result.report.repairs, [r.reason for r in result.report.repairs]
    onnx.checker.check_model(result.model, full_check=True)
    assert input_dims(result.model) == input_dims(original)  # symbolic dims stay declared
    if name not in NOTHING_TO_REMOVE:
        assert result.plan.n_removed > 0
        assert result.report.macs_after < result.report.macs_before
    for batch in batches if dynamic else (at,):
        feeds = _feeds(original, batched_inputs(name, batch))
        ok, diff = verify_onnx(original, result.model, result.plan, feeds)
        assert ok, f"{name} ({exporter}, {'dynamic' if dynamic else 'static'} batch): " \
                   f"not mask-equivalent at batch {batch}, max |diff| {diff:.3g}"


@pytest.mark.parametrize("name", MODELS)
def test_torchscript_dynamic_batch(name: str) -> None:
    _check(name, "torchscript", True, BATCHES)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", MODELS)
def test_torchscript_static(name: str, batch: int) -> None:
    _check(name, "torchscript", False, (batch,))


@pytest.mark.parametrize("name", DYNAMO_DEFAULT)
def test_dynamo_dynamic_batch(name: str) -> None:
    _check(name, "dynamo", True, BATCHES)


@pytest.mark.parametrize("name", DYNAMO_STATIC_DEFAULT)
def test_dynamo_static(name: str) -> None:
    _check(name, "dynamo", False, (1,))


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in MODELS if n not in DYNAMO_DEFAULT])
def test_dynamo_dynamic_batch_all(name: str) -> None:
    _check(name, "dynamo", True, BATCHES)


@pytest.mark.slow
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", MODELS)
def test_dynamo_static_all(name: str, batch: int) -> None:
    _check(name, "dynamo", False, (batch,))
