"""ONNX Runtime CPU latency: dense vs channel-pruned ResNet-50-style and ViT-style models.

Does removing channels buy what it removes in MACs on ONNX Runtime's CPU provider, and does the
width rounding matter? Until the pruner produces them, "pruned" models are the same
architecture built narrower: every prunable width divided by sqrt(2) (~2x fewer MACs) or 2 (~4x
fewer MACs), then rounded either to a multiple of 16 (``r16``) or to the nearest *odd* width
(``odd``: what an unconstrained pruner gives, and never a multiple of any SIMD block). Graph
inputs/outputs keep their size, as pruning would keep them.

Each architecture is exported once per variant (``export_onnx``, dynamic batch, verified
against torch), then ``secateurs.runtime.ort.compare`` times all its variants interleaved at
batch 1 and 16 with 1 and 2 intra-op threads. MACs are counted on the ONNX graph (Conv, Gemm,
MatMul) after shape inference at batch 1. ``efficiency`` = speedup / MAC reduction: 1.0 means
latency fell exactly as much as the arithmetic.

    python tools/bench/ort_latency.py [--repeats 8] [--out tools/bench/results/ort_latency.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
from onnx import shape_inference

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from machine import cpu_info  # noqa: E402  (tools/bench/machine.py)

from secateurs.runtime.io import atomic_write_bytes  # noqa: E402
from secateurs.runtime.onnx_export import export_onnx  # noqa: E402
from secateurs.runtime.ort import compare  # noqa: E402

# --------------------------------------------------------------------------------------------
# Width rules
# --------------------------------------------------------------------------------------------


def round_width(width: float, rounding: str) -> int:
    """``r16``: nearest multiple of 16 (>= 16); ``odd``: nearest odd integer (>= 1)."""
    if rounding == "dense":
        return int(width)
    if rounding == "r16":
        return max(16, int(round(width / 16)) * 16)
    if rounding == "odd":
        return max(1, 2 * int(math.floor(width / 2)) + 1)
    raise ValueError(rounding)


# --------------------------------------------------------------------------------------------
# ResNet-50-style
# --------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet50Style(nn.Module):
    """torchvision ResNet-50 topology (stem, [3, 4, 6, 3] bottlenecks, fc) with free widths."""

    def __init__(self, stem: int, mids: list[int], outs: list[int], classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], stem
        for stage, (n, mid, cout) in enumerate(zip([3, 4, 6, 3], mids, outs)):
            for i in range(n):
                blocks.append(Bottleneck(cin, mid, cout, 2 if (i == 0 and stage > 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def resnet50_style(factor: float, rounding: str) -> nn.Module:
    r = lambda w: round_width(w / factor, rounding)  # noqa: E731
    return ResNet50Style(r(64), [r(w) for w in (64, 128, 256, 512)],
                         [r(w) for w in (256, 512, 1024, 2048)])


# --------------------------------------------------------------------------------------------
# ViT-style
# --------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
        y = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, hidden: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, head_dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViTStyle(nn.Module):
    """ViT-S/16-like: patch conv, class token, pre-norm blocks, head."""

    def __init__(self, dim: int, heads: int, head_dim: int, hidden: int, depth: int,
                 image: int, patch: int = 16, classes: int = 1000):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        tokens = (image // patch) ** 2 + 1
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, head_dim, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def vit_style(factor: float, rounding: str, image: int, depth: int) -> nn.Module:
    r = lambda w: round_width(w / factor, rounding)  # noqa: E731
    # Heads stay (a head count is pruned whole or not at all); head dims, the residual width
    # and the MLP hidden width shrink, as a head-dim + channel pruner would shrink them.
    return ViTStyle(dim=r(384), heads=6, head_dim=r(64), hidden=r(1536), depth=depth,
                    image=image)


# --------------------------------------------------------------------------------------------
# MACs
# --------------------------------------------------------------------------------------------


def count_macs(model: onnx.ModelProto) -> int:
    """Multiply-accumulates of Conv / Gemm / MatMul per sample (shapes inferred at batch 1)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for inp in m.graph.input:
        dim0 = inp.type.tensor_type.shape.dim[0]
        dim0.Clear()
        dim0.dim_value = 1
    m = shape_inference.infer_shapes(m, data_prop=True)
    shapes = {}
    for vi in [*m.graph.value_info, *m.graph.input, *m.graph.output]:
        dims = [d.dim_value if d.HasField("dim_value") else None
                for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    for t in m.graph.initializer:
        shapes[t.name] = list(t.dims)
    total = 0
    for node in m.graph.node:
        out = shapes.get(node.output[0])
        if node.op_type not in ("Conv", "Gemm", "MatMul") or not out or None in out:
            continue
        w = shapes.get(node.input[1])
        if node.op_type == "Conv":
            # weight [K, C_in/group, kH, kW]: each output element costs C_in/group * kH * kW
            total += math.prod(out) * math.prod(w[1:]) if w else 0
        else:
            a = shapes.get(node.input[0])
            if a and None not in a:
                trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
                k = a[-2] if (node.op_type == "Gemm" and trans_a) else a[-1]
                total += math.prod(out) * k
    return total


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

VARIANTS = [("dense", 1.0, "dense"), ("2x-r16", math.sqrt(2), "r16"),
            ("2x-odd", math.sqrt(2), "odd"), ("4x-r16", 2.0, "r16"), ("4x-odd", 2.0, "odd")]


def bench_arch(name: str, build: Callable[[float, str], nn.Module], example: torch.Tensor,
               workdir: Path, threads: list[int], batches: list[int], warmup: int,
               repeats: int) -> dict:
    paths, macs, widths = [], {}, {}
    for label, factor, rounding in VARIANTS:
        torch.manual_seed(0)
        model = build(factor, rounding).eval()
        path = workdir / f"{name}-{label}.onnx"
        start = time.perf_counter()
        proto = export_onnx(model, example, path, dynamic_batch=True)
        macs[label] = count_macs(proto)
        widths[label] = sorted({int(p.shape[0]) for n, p in model.named_parameters()
                                if p.ndim >= 2 and "pos" not in n and "cls" not in n})
        print(f"  {name}-{label}: {macs[label] / 1e9:.2f} GMAC/sample, "
              f"export {time.perf_counter() - start:.1f} s", file=sys.stderr)
        paths.append(str(path))
    table = compare(paths[0], paths[1:], threads=threads, batch=batches, warmup=warmup,
                    repeats=repeats, names=[v[0] for v in VARIANTS],
                    progress=lambda m: print(f"  {name}: {m}", file=sys.stderr, flush=True))
    print(table.to_text(), file=sys.stderr)
    rows = []
    for r in table.rows:
        reduction = macs["dense"] / macs[r.model]
        rows.append({"model": r.model, "threads": r.threads, "batch": r.batch,
                     "p50_ms": r.stats.p50, "p90_ms": r.stats.p90, "p99_ms": r.stats.p99,
                     "mean_ms": r.stats.mean, "throughput": r.stats.throughput,
                     "speedup_p50": r.speedup_p50, "mac_reduction": reduction,
                     "efficiency": r.speedup_p50 / reduction})
    return {"arch": name, "input_shape": list(example.shape[1:]),
            "gmacs_per_sample": {k: v / 1e9 for k, v in macs.items()},
            "out_channel_widths": widths, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--resnet-image", type=int, default=128,
                        help="ResNet input resolution (224 is the original; 128 keeps the "
                        "batch-16 runs short on a 2-core machine)")
    parser.add_argument("--vit-image", type=int, default=160)
    parser.add_argument("--vit-depth", type=int, default=6)
    parser.add_argument("--only", choices=["resnet50", "vit"], default=None)
    parser.add_argument("--out", default="tools/bench/results/ort_latency.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    archs = {
        "resnet50": (resnet50_style, torch.randn(1, 3, args.resnet_image, args.resnet_image)),
        "vit": (lambda f, r: vit_style(f, r, args.vit_image, args.vit_depth),
                torch.randn(1, 3, args.vit_image, args.vit_image)),
    }
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (build, example) in archs.items():
            if args.only and name != args.only:
                continue
            print(f"{name}:", file=sys.stderr)
            results.append(bench_arch(name, build, example, Path(tmp), args.threads, args.batch,
                                      args.warmup, args.repeats))
    doc = {"benchmark": "ort_latency", "onnxruntime": ort.__version__, "torch": torch.__version__,
           "machine": platform.machine(), "cpu": cpu_info(), "cpu_count": os.cpu_count(),
           "variants": {v[0]: {"width_divisor": v[1], "rounding": v[2]} for v in VARIANTS},
           "warmup": args.warmup, "repeats": args.repeats, "archs": results}
    atomic_write_bytes(args.out, (json.dumps(doc, indent=1) + "\n").encode())
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
