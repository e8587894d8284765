"""Hugging Face models as a deployment pipeline meets them: exported to ONNX by torch's own
exporters (TorchScript and dynamo), then pruned by ``prune_onnx`` with no knowledge of the
torch model. Every family that exports must prune (heads, MLP or hidden width) and stay
mask-equivalent under ONNX Runtime, checker clean.

Randomly initialised models are the hard case here: every zero bias and every LayerNorm weight
of one width is deduplicated into one initializer by both exporters, which coupled unrelated
layers until ``graph/onnx_untie.py`` (a Swin exported this way pruned nothing). Families the
exporter itself cannot export (transformers' mask code and MoE routing use ops without an ONNX
symbolic) are skipped with the exporter's message: that failure is torch's, not ours.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import onnx
import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402

from secateurs.hf.models import ZOO, example_inputs, tiny_model  # noqa: E402
from secateurs.passes.prune_onnx import prune_onnx  # noqa: E402

transformers.logging.set_verbosity_error()

# (family, exporter) pairs run by default: both exporters, encoders, decoders and vision
DEFAULT = {("bert", "torchscript"), ("swin", "torchscript"), ("convnext", "torchscript"),
           ("llama", "dynamo"), ("gpt2", "dynamo"), ("vit", "dynamo")}
CASES = [pytest.param(f, e, id=f"{f}-{e}",
                      marks=() if (f, e) in DEFAULT else pytest.mark.slow)
         for f in ZOO for e in ("torchscript", "dynamo")]


class _Logits(torch.nn.Module):
    """The model's first output as one tensor (what an exported graph returns)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if len(args) == 2:  # encoder-decoder: input ids, decoder input ids
            return self.model(input_ids=args[0], decoder_input_ids=args[1],
                              return_dict=False)[0]
        return self.model(*args, return_dict=False)[0]


def _export(family: str, exporter: str, path: str) -> None:
    model = tiny_model(family)
    inputs = tuple(a for a in example_inputs(model) if a is not None)
    names = [f"input_{i}" for i in range(len(inputs))]
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                torch.onnx.export(_Logits(model), inputs, path, dynamo=True,
                                  input_names=names, output_names=["out"])
            else:
                torch.onnx.export(_Logits(model), inputs, path, dynamo=False, opset_version=17,
                                  input_names=names, output_names=["out"])
    except Exception as exc:  # the exporter's own limitation, reported as a skip
        pytest.skip(f"torch.onnx ({exporter}) cannot export {family}: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")


@pytest.mark.parametrize("family,exporter", CASES)
def test_exported_family_prunes_exactly(family: str, exporter: str, tmp_path) -> None:
    path = str(tmp_path / f"{family}.onnx")
    _export(family, exporter, path)
    result = prune_onnx(path, ratio=0.5, round_to=1, verify=True)
    assert result.report.exact is True, f"max diff {result.report.max_abs_diff}"
    assert result.report.macs_kept < 0.9, (
        f"{family} ({exporter}) kept {result.report.macs_kept:.0%} of its MACs: "
        + "; ".join(f"{r.members}: {r.pinned}" for r in result.report.groups
                    if r.pinned)[:600])
    onnx.checker.check_model(result.model, full_check=True)
