"""2:4 semi-structured sparse Linear vs dense on a CUDA GPU (sparse tensor cores).

For each GEMM shape ``(tokens, in, out)`` and dtype (fp16, bf16) the weight is pruned to 2:4
along ``in`` with :func:`secateurs.passes.sparsify.sparsify` (magnitude), converted with
``torch.sparse.to_sparse_semi_structured``, and ``F.linear(x, W_2:4)`` is timed against the
dense ``F.linear(x, W)`` with CUDA events (median of repeats, after warm-up). Outputs are
checked against the masked dense weights. Needs an Ampere-or-newer GPU; exits with a message
(status 0) where CUDA is unavailable, so it is safe to run anywhere.

    python tools/bench/semi_structured_gpu.py [--repeats 50] [--out tools/bench/results/semi_structured_gpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from secateurs.passes.sparsify import is_nm_sparse, sparsify  # noqa: E402

SHAPES = [(tokens, k, n) for tokens in (64, 512, 4096) for k, n in ((1024, 1024), (4096, 4096), (4096, 11008), (11008, 4096))]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def cuda_median_ms(fn: object, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "semi_structured_gpu.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("semi_structured_gpu: no CUDA device available; this benchmark needs an Ampere-or-newer GPU. Skipped.")
        return 0
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        print(f"semi_structured_gpu: {torch.cuda.get_device_name()} (sm_{major}x) has no sparse tensor cores. Skipped.")
        return 0
    from torch.sparse import to_sparse_semi_structured

    rows = []
    print(f"{'tokens':>6} {'in':>6} {'out':>6} {'dtype':>5} {'dense ms':>9} {'2:4 ms':>8} {'speed-up':>8}")
    for tokens, k, n in SHAPES:
        for dname, dtype in DTYPES.items():
            layer = torch.nn.Linear(k, n, bias=False)
            weight = sparsify(layer, pattern="2:4").model.weight.detach().to("cuda", dtype)
            assert is_nm_sparse(weight, 2, 4, axis=1)
            x = torch.randn(tokens, k, device="cuda", dtype=dtype)
            try:
                sparse = to_sparse_semi_structured(weight)
            except (RuntimeError, ValueError) as exc:
                print(f"{tokens:>6} {k:>6} {n:>6} {dname:>5}  unsupported: {exc}")
                continue
            dense_out = F.linear(x, weight)
            if not torch.allclose(F.linear(x, sparse), dense_out, rtol=2e-2, atol=2e-1):
                raise SystemExit(f"2:4 output disagrees with dense at tokens={tokens} {k}x{n} {dname}")
            dense_ms = cuda_median_ms(lambda x=x, w=weight: F.linear(x, w), args.repeats)
            sparse_ms = cuda_median_ms(lambda x=x, w=sparse: F.linear(x, w), args.repeats)
            rows.append({"tokens": tokens, "in": k, "out": n, "dtype": dname, "dense_ms": dense_ms,
                         "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms})
            print(f"{tokens:>6} {k:>6} {n:>6} {dname:>5} {dense_ms:>9.4f} {sparse_ms:>8.4f} {dense_ms / sparse_ms:>8.2f}",
                  flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "repeats": args.repeats,
               "results": rows}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
