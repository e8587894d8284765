"""The CPU a benchmark ran on, for its JSON (``secateurs.runtime.cpu``): ONNX Runtime's
kernels differ by instruction set (MLAS's NCHWc block is 8 channels on AVX2 and 16 on AVX-512;
int8 is fast only with VNNI or AMX), so a latency ratio means little without it."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from secateurs.runtime.cpu import cpu_info as _host  # noqa: E402

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_tile", "amx_int8", "amx_bf16")


def cpu_info() -> dict[str, Any]:
    """``{"model", "isa", "cpus", "machine"}``: the CPU's model name and the instruction-set
    flags of ``ISA_FLAGS`` it has."""
    host = _host()
    return {"model": host.model, "isa": [f for f in ISA_FLAGS if f in host.flags],
            "cpus": os.cpu_count() or 0, "machine": host.machine}
