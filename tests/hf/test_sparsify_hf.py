"""``secateurs.sparsify`` on Hugging Face models as the Hub ships them: GPT-2's ``Conv1D``
layers, tied input/output embeddings, the KV cache on (``use_cache=True``, every checkpoint's
default) and MoE experts' batched weights. Found by the sparsify sweep of session 12."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402

import secateurs  # noqa: E402
from secateurs.hf.models import example_inputs, tiny_model  # noqa: E402
from secateurs.passes.sparsify import is_nm_sparse  # noqa: E402

transformers.logging.set_verbosity_error()
torch.set_num_threads(1)


def _zero_fraction(t: torch.Tensor) -> float:
    return float((t == 0).float().mean())


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_gpt2_conv1d_is_sparsified_along_its_reduction_dim(method) -> None:
    """GPT-2's attention and MLP are transformers ``Conv1D`` (weight ``[in, out]``, applied as
    ``x @ W``): they were never candidates, and the report said "1 layer sparsified, 0
    skipped". Their 2:4 groups run along dim 0, the dim the forward reduces."""
    model = tiny_model("gpt2")
    (ids,) = example_inputs(model)
    calibration = None if method == "magnitude" else [{"input_ids": ids}]
    result = secateurs.sparsify(model, "2:4", method=method, calibration=calibration)
    conv1d = {n: m for n, m in result.model.named_modules() if type(m).__name__ == "Conv1D"}
    assert len(conv1d) == 4 * model.config.n_layer
    for name, module in conv1d.items():
        assert is_nm_sparse(module.weight, 2, 4, axis=0), name  # reduction dim
        assert not is_nm_sparse(module.weight, 2, 4, axis=1), name  # the other one is not
        assert f"{name}.weight" in result.masks
    reported = {layer.name: layer for layer in result.report.layers}
    assert all(reported[f"{n}.weight"].valid for n in conv1d)
    assert result.report.sparsity == pytest.approx(0.5, abs=0.01)
    with torch.no_grad():
        logits = result.model(ids).logits
    assert torch.isfinite(logits).all()
    if method != "magnitude":  # calibrated: closer to dense than no calibration at all
        with torch.no_grad():
            dense = model(ids).logits
            plain = secateurs.sparsify(model, "2:4").model(ids).logits
        assert torch.dist(logits, dense) < torch.dist(plain, dense) * 1.05


def test_tied_lm_head_is_skipped_not_sparsified_through_the_embedding() -> None:
    """``lm_head`` shares its Parameter with the token embedding: sparsifying it zeroed half
    of the embedding, unreported (and SparseGPT rewrote the embedding's kept values). It is
    now skipped with the reason, and its tied name is a valid ``ignore`` entry."""
    model = tiny_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    before = model.transformer.wte.weight.detach().clone()
    (ids,) = example_inputs(model)
    result = secateurs.sparsify(model, "2:4", method="sparsegpt",
                                calibration=[{"input_ids": ids}])
    assert torch.equal(result.model.transformer.wte.weight, before)
    assert "lm_head.weight" not in result.masks
    skipped = {s.name: s.reason for s in result.report.skipped}
    assert "shares its weight with 'transformer.wte.weight'" in skipped["lm_head.weight"]
    secateurs.sparsify(model, "2:4", ignore=["lm_head.weight"])  # was "not found"


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibration_with_the_kv_cache_on(method) -> None:
    """With ``use_cache=True`` the chained calibration replayed the decoder layers' kwargs,
    cache included: every replay appended K/V again. A padded batch raised "The size of
    tensor a (16) must match ... (8)"; unpadded, 15 of 22 layers got other masks than with
    the cache off. The masks must not depend on the cache, and the caller's config is kept."""
    cached, plain = tiny_model("llama", use_cache=True), tiny_model("llama", use_cache=False)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # right-padded row
    batches = [{"input_ids": ids, "attention_mask": mask},
               {"input_ids": torch.randint(3, 128, (2, 8), generator=g)}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = secateurs.sparsify(cached, "2:4", method=method, calibration=batches)
        b = secateurs.sparsify(plain, "2:4", method=method, calibration=batches)
    assert a.masks.keys() == b.masks.keys() and len(a.masks) > 10
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in b.masks)
    assert cached.config.use_cache is True and a.model.config.use_cache is True


def test_moe_expert_weights_are_sparsified_along_each_experts_reduction_dim() -> None:
    """Mixtral's experts are 3-D parameters (``gate_up_proj [E, 2I, H]``) used by grouped
    matmuls, not Linears: they stayed dense while the report said "N sparsified, 0 skipped"
    (model sparsity 0.087 for an implied 0.5), then were listed as left dense. Magnitude now
    sparsifies them expert by expert, groups along what each product reduces over (H for
    gate_up, I for down_proj; the other dims when transposed, GPT-OSS); a calibrated method
    leaves them dense, saying why."""
    from secateurs.hf.moe import moe_blocks
    from secateurs.passes.sparsify import is_nm_sparse

    for family in ("mixtral", "gpt_oss"):
        model = tiny_model(family)
        blocks = moe_blocks(model)
        result = secateurs.sparsify(model, "2:4", min_numel=1)
        layers = {layer.name: layer for layer in result.report.layers}
        params = dict(result.model.named_parameters())
        experts = [(n, b.inter) for b in blocks for n in b.expert_tensors if params[n].dim() == 3]
        assert experts
        for name, inter in experts:
            weight = params[name].detach()
            reduce = inter if name.endswith("down_proj") else model.config.hidden_size
            axes = [d for d in (1, 2) if weight.shape[d] == reduce]
            assert len(axes) == 1, (family, name, weight.shape)  # the tiny config tells them
            assert is_nm_sparse(weight, 2, 4, axes[0]), (family, name)
            assert layers[name].kind == "experts" and layers[name].valid
            assert layers[name].sparsity == 0.5
            assert result.masks[name].shape == weight.shape
        batch = {"input_ids": torch.randint(0, 50, (1, 8))}
        assert torch.isfinite(result.model(**batch).logits).all()
    model = tiny_model("mixtral")
    wanda = secateurs.sparsify(model, "2:4", method="wanda",
                               calibration=[{"input_ids": torch.randint(0, 50, (1, 8))}])
    skipped = {s.name: s.reason for s in wanda.report.skipped}
    experts = [n for n, p in model.named_parameters() if p.dim() == 3]
    assert all("method='magnitude'" in skipped[n] for n in experts)
    assert all(_zero_fraction(dict(wanda.model.named_parameters())[n]) == 0.0 for n in experts)
