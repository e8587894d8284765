"""Where does block-sparse (BSR) matmul beat dense on this CPU?

For each weight shape ``[out, in]``, block size ``b`` and block sparsity ``s`` (a fraction ``s``
of the ``b×b`` blocks are zero, chosen at random), time ``torch.mm(W_bsr, x.T)`` against the dense
``torch.mm(W, x.T)`` (and CSR of the same weight, for reference) for activations ``x`` of shape
``[tokens, in]``. The three are timed interleaved (one run of each per round) so machine noise
hits them equally; the report gives medians and ``dense / sparse`` speed-ups (> 1: sparse wins).
Results are checked against dense before timing.

    python tools/bench/bsr_cpu.py [--threads 1] [--repeats 15] [--out tools/bench/results/bsr_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from machine import cpu_info  # noqa: E402  (tools/bench/machine.py)

SHAPES = [(1024, 1024), (4096, 1024), (1024, 4096)]
BLOCKS = [16, 32, 64]
SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95]
TOKENS = [16, 128]


def block_sparse_weight(out: int, inp: int, block: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    tiles = out // block * (inp // block)
    keep = torch.ones(tiles, dtype=torch.bool)
    keep[torch.randperm(tiles, generator=gen)[: round(sparsity * tiles)]] = False
    keep = keep.reshape(out // block, inp // block).repeat_interleave(block, 0).repeat_interleave(block, 1)
    return torch.randn(out, inp, generator=gen) * keep


def time_interleaved(fns: dict[str, object], repeats: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bsr_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")
    gen = torch.Generator().manual_seed(0)

    rows = []
    print(f"{'shape':>10} {'tok':>4} {'block':>5} {'sparsity':>8} {'dense ms':>9} {'bsr ms':>8} {'csr ms':>8} "
          f"{'dense/bsr':>9} {'dense/csr':>9}")
    for out, inp in SHAPES:
        for tokens in TOKENS:
            x = torch.randn(tokens, inp, generator=gen)
            for block in BLOCKS:
                for sparsity in SPARSITIES:
                    w = block_sparse_weight(out, inp, block, sparsity, gen)
                    w_bsr = w.to_sparse_bsr((block, block))
                    w_csr = w.to_sparse_csr()
                    ref = torch.mm(w, x.T)
                    for sparse in (w_bsr, w_csr):
                        if not torch.allclose(torch.mm(sparse, x.T), ref, rtol=1e-4, atol=1e-3):
                            raise SystemExit(f"sparse matmul disagrees with dense at {out}x{inp} b={block}")
                    med = time_interleaved({
                        "dense": lambda w=w, x=x: torch.mm(w, x.T),
                        "bsr": lambda w=w_bsr, x=x: torch.mm(w, x.T),
                        "csr": lambda w=w_csr, x=x: torch.mm(w, x.T),
                    }, args.repeats)
                    row = {"out": out, "in": inp, "tokens": tokens, "block": block, "sparsity": sparsity,
                           "dense_ms": med["dense"] * 1e3, "bsr_ms": med["bsr"] * 1e3, "csr_ms": med["csr"] * 1e3,
                           "speedup_bsr": med["dense"] / med["bsr"], "speedup_csr": med["dense"] / med["csr"]}
                    rows.append(row)
                    print(f"{out:>5}x{inp:<4} {tokens:>4} {block:>5} {sparsity:>8.0%} {row['dense_ms']:>9.3f} "
                          f"{row['bsr_ms']:>8.3f} {row['csr_ms']:>8.3f} {row['speedup_bsr']:>9.2f} "
                          f"{row['speedup_csr']:>9.2f}", flush=True)

    print("\nlowest sparsity at which BSR beats dense (speed-up > 1.1), per shape/tokens/block:")
    crossover = []
    for out, inp in SHAPES:
        for tokens in TOKENS:
            for block in BLOCKS:
                wins = [r["sparsity"] for r in rows if (r["out"], r["in"], r["tokens"], r["block"]) == (out, inp, tokens, block)
                        and r["speedup_bsr"] > 1.1]
                first = min(wins) if wins else None
                crossover.append({"out": out, "in": inp, "tokens": tokens, "block": block, "bsr_wins_from": first})
                print(f"  {out}x{inp} tokens={tokens} block={block}: {'never' if first is None else f'{first:.0%}'}")

    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"torch": torch.__version__, "threads": args.threads, "repeats": args.repeats,
               "machine": platform.machine(), "cpu": cpu_info(), "cpus": os.cpu_count(),
               "results": rows, "crossover": crossover}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
