"""Sequential least-squares recovery of pruned output projections: every refit lowers its
layer's reconstruction error, the reported error is the one a direct computation gives, only
output projections change, held-out outputs move towards the dense model, padding is left out."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

from secateurs.errors import InputError  # noqa: E402
from secateurs.hf import prune_hf  # noqa: E402
from secateurs.hf.models import example_inputs, output_tensor, tiny_model  # noqa: E402
from secateurs.hf.recovery import SITES, refit_output_projections  # noqa: E402

warnings.filterwarnings("ignore")
torch.set_num_threads(1)


_out = output_tensor


def _calibration(family, n=4):
    return [example_inputs(family, batch=8, seq=16, seed=s) for s in range(n)]


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2", "vit"])
def test_refit_lowers_layer_and_held_out_error(family):
    dense = tiny_model(family)
    calib = _calibration(family)
    r = prune_hf(dense, calib[0], heads=0.5, mlp=0.5)
    held = example_inputs(family, batch=8, seq=16, seed=99)
    before = (_out(r.model, held) - _out(dense, held)).pow(2).mean()
    rep = refit_output_projections(dense, r.model, calib)
    assert len(rep.fits) == 2 * 2  # attention and MLP output projection of both layers
    for f, (proj, _site) in zip(rep.fits[:2], SITES[family], strict=True):
        assert f.name.endswith(f"0.{proj}"), f.name
    for f in rep.fits:
        assert f.tokens > f.features
        assert f.error_after < f.error_before, f
    after = (_out(r.model, held) - _out(dense, held)).pow(2).mean()
    assert after < before


def test_reported_error_is_the_direct_one_and_only_projections_change():
    dense = tiny_model("bert")
    calib = _calibration("bert", 2)
    pruned = prune_hf(dense, calib[0], heads=0.5, mlp=0.5).model
    old = {k: v.clone() for k, v in pruned.state_dict().items()}
    rep = refit_output_projections(dense, pruned, calib)
    changed = {k for k, v in pruned.state_dict().items() if not torch.equal(v, old[k])}
    assert changed == {f"encoder.layer.{i}.{p}.{t}" for i in range(2)
                       for p in ("attention.output.dense", "output.dense")
                       for t in ("weight", "bias")}
    # layer 0, attention: both models see the same embeddings, so the target is the dense
    # LayerNorm input minus the pruned residual
    grabbed = {}

    def keep(key):
        def hook(mod, args, out=None):
            grabbed.setdefault(key, []).append(args[0] if out is None or key != "y" else out)
        return hook

    hooks = [dense.encoder.layer[0].attention.output.LayerNorm.register_forward_pre_hook(
                 keep("s_d")),
             pruned.encoder.layer[0].attention.output.LayerNorm.register_forward_pre_hook(
                 keep("s_p")),
             pruned.encoder.layer[0].attention.output.dense.register_forward_hook(keep("y"))]
    with torch.no_grad():
        for b in calib:
            dense(*b)
            pruned(*b)
    for h in hooks:
        h.remove()
    s_d, s_p, y = (torch.cat(grabbed[k]).double() for k in ("s_d", "s_p", "y"))
    t = s_d - (s_p - y)
    direct = float((y - t).pow(2).sum() / t.pow(2).sum())
    assert rep.fits[0].error_after == pytest.approx(direct, rel=1e-5)


def test_padding_is_not_calibration_data():
    dense = tiny_model("bert")
    ids = example_inputs("bert", batch=4, seq=12)[0]
    mask = torch.ones_like(ids)
    mask[:, 9:] = 0
    mask[0, 5:] = 0
    calib = [{"input_ids": ids, "attention_mask": mask}] * 8
    pruned = prune_hf(dense, (ids,), heads=0.5, mlp=0.5).model
    rep = refit_output_projections(dense, pruned, calib)
    assert {f.tokens for f in rep.fits} == {8 * int(mask.sum())}


def test_refuses_what_it_cannot_pair():
    dense = tiny_model("llama")
    x = example_inputs("llama")
    lossy = prune_hf(dense, x, hidden=0.25, allow_lossy=True).model
    with pytest.raises(InputError, match="hidden size"):
        refit_output_projections(dense, lossy, [x])
    shallow = prune_hf(dense, x, mlp=0.25, blocks=1).model
    with pytest.raises(InputError, match="layer counts"):
        refit_output_projections(dense, shallow, [x])
