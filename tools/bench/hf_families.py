"""Every tiny HF family through prune -> check -> checked save -> reload (the issue-12 survey).

For each family of ``secateurs.hf.models.ZOO`` (random weights from a small config, no hub):
``prune_hf(heads=.5, mlp=.5)`` (and ``experts=1`` in MoE models), the per-kind report,
mask-equivalence against the original with the removed slices zeroed (and, for removed
experts, their router logits at -inf: ``moe.expert_reference``), the safety net's repairs, ``secateurs.hf.save_pretrained`` (which reloads through
``from_pretrained_pruned`` and refuses a round trip that differs) and, when it saved, the
reloaded model's outputs against the in-memory pruned model. Writes
``tools/bench/results/hf_families.json``.

    python tools/bench/hf_families.py [family ...]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def run(family: str) -> dict:
    from secateurs.hf import from_pretrained_pruned, prune_hf, save_pretrained
    from secateurs.hf.models import example_inputs, output_tensor, tiny_model
    from secateurs.hf.moe import expert_reference, moe_blocks

    row: dict = {"family": family}
    t0 = time.perf_counter()
    try:
        m = tiny_model(family)
        x = example_inputs(m)
        r = prune_hf(m, x, heads=0.5, mlp=0.5, experts=1 if moe_blocks(m) else 0)
        row["report"] = {k: {"asked": v.asked, "removed": v.removed, "reasons": v.reasons}
                         for k, v in r.report.items()}
        row["macs_kept"] = round(r.macs_kept, 3)
        row["needs_loader"] = r.needs_loader
        row["repairs"] = [rep.reason for rep in r.repairs]
        a, b = output_tensor(r.model, x), output_tensor(expert_reference(m, r.plan), x)
        row["mask_equivalence_max_err"] = float((a - b).abs().max())
        with tempfile.TemporaryDirectory() as d:
            try:
                save_pretrained(r, os.path.join(d, "m"))
            except Exception as e:  # noqa: BLE001 - a refusal is a result
                row["saved"] = False
                row["refused"] = f"{type(e).__name__}: {str(e)[:300]}"
            else:
                row["saved"] = True
                back = from_pretrained_pruned(os.path.join(d, "m"))
                # the same tensors, and the same outputs up to the kernels' rounding (a tensor
                # mapped from the file may sit at another alignment: another CPU code path)
                mine, theirs = r.model.state_dict(), back.state_dict()
                row["reload_identical"] = mine.keys() == theirs.keys() and all(
                    torch.equal(mine[k], theirs[k]) for k in mine) and bool(
                    torch.allclose(output_tensor(back, x), a, rtol=1e-6, atol=1e-6))
    except Exception as e:  # noqa: BLE001 - the survey records every failure
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def main() -> None:
    import transformers

    from secateurs.hf.models import ZOO

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    rows = [run(f) for f in (sys.argv[1:] or ZOO)]
    for r in rows:
        print(json.dumps(r), flush=True)
    if not sys.argv[1:]:
        out = os.path.join(os.path.dirname(__file__), "results", "hf_families.json")
        with open(out, "w") as f:
            json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
