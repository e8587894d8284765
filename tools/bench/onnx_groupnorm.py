"""GroupNorm as the exporters decompose it: does the ONNX analysis time depend on the image size?

A small GroupNorm U-Net (two down, two up levels, skip concats, ConvTranspose upsampling; every
norm a ``GroupNorm(8, C)``) is exported with the TorchScript exporter at opset 17, which writes
each GroupNorm as ``Reshape [N, G, -1] → InstanceNormalization → Reshape → Mul → Add``, at
32², 64² and 128². ``analyze_onnx`` runs on each export twice: as built (the lowering
recognises the decomposition as one ``group_norm``) and with the recognition switched off (the
reshape to ``[N, G, C/G·H·W]`` then composes one label per channel and spatial position, the
behaviour before). A native ``GroupNormalization`` (opset 21 semantics) export is not
available from torch's exporters at opset 17, so the recognised path is the comparison.
Reported: median of 3 runs, seconds, peak RSS growth is not measured here (see onnx_big.py).

    python tools/bench/onnx_groupnorm.py [--sizes 32,64,128] [--out tools/bench/results/onnx_groupnorm.json]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import secateurs.graph.from_onnx as from_onnx  # noqa: E402
from secateurs.passes.prune_onnx import analyze_onnx, prune_onnx  # noqa: E402


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class UNet(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.enc1, self.enc2, self.mid = _block(3, w), _block(w, 2 * w), _block(2 * w, 4 * w)
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = _block(4 * w, 2 * w)
        self.up1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.dec1 = _block(2 * w, w)
        self.head = nn.Conv2d(w, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        m = self.mid(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


def export(size: int) -> onnx.ModelProto:
    torch.manual_seed(0)
    model = UNet().eval()
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, size, size),), buf, dynamo=False,
                          opset_version=17)
    return onnx.load_from_string(buf.getvalue())


def timed(fn, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="32,64,128")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "onnx_groupnorm.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        model = export(size)
        n_in = sum(n.op_type == "InstanceNormalization" for n in model.graph.node)
        recognised = timed(lambda m=model: analyze_onnx(m))
        saved = from_onnx.group_norm_decompositions
        from_onnx.group_norm_decompositions = lambda *a: []
        try:
            unfused = timed(lambda m=model: analyze_onnx(m), rounds=1 if size > 64 else 3)
        finally:
            from_onnx.group_norm_decompositions = saved
        result = prune_onnx(model, ratio=0.5, round_to=1, verify=True)
        rows.append({"size": size, "instance_norms": n_in,
                     "analyze_s_recognised": round(recognised, 4),
                     "analyze_s_decomposed": round(unfused, 4),
                     "speedup": round(unfused / recognised, 1),
                     "prune_exact": result.report.exact,
                     "macs_kept": round(result.report.macs_kept, 3)})
        print(rows[-1], flush=True)
    doc = {"bench": "onnx_groupnorm", "platform": platform.platform(),
           "torch": torch.__version__, "onnx": onnx.__version__, "threads": 1, "rows": rows}
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
