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


def test_masked_sdpa_export_prunes_whole_heads(tmp_path) -> None:
    """With an attention mask, the TorchScript exporter guards sdpa's softmax with
    ``Where(IsNaN(p), 0, p)``; IsNaN had no channel rule and pinned every head (the real
    all-MiniLM-L6-v2 kept 12 of 12 heads and halved the head dims instead)."""
    model = tiny_model("bert", attn_implementation="sdpa")
    ids = example_inputs(model)[0]
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0

    class Masked(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=ids, attention_mask=mask, return_dict=False)[0]

    path = str(tmp_path / "bert_masked.onnx")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(Masked(model), (ids, mask), path, dynamo=False, opset_version=17,
                          input_names=["ids", "mask"], output_names=["out"])
    assert any(n.op_type == "IsNaN" for n in onnx.load(path).graph.node)
    result = prune_onnx(path, ratio=0.5, round_to=1, verify=True)
    assert result.report.exact is True
    assert not any("IsNaN" in row.pinned for row in result.report.groups)
    heads = model.config.num_attention_heads
    head_rows = [row for row in result.report.groups if row.units_before == heads
                 and "query" in row.members]
    assert head_rows and all(row.units_after == heads // 2 for row in head_rows)
