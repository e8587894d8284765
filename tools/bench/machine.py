"""The CPU a benchmark ran on, for its JSON: ONNX Runtime's kernels differ by instruction set
(MLAS's NCHWc block is 8 channels on AVX2 and 16 on AVX-512; int8 is fast only with VNNI or
AMX), so a latency ratio means little without it."""

from __future__ import annotations

import os
import platform
from typing import Any

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_tile", "amx_int8", "amx_bf16")


def cpu_info() -> dict[str, Any]:
    """``{"model", "isa", "cpus", "machine"}``: the CPU's model name and the instruction-set
    flags of ``ISA_FLAGS`` it has (from ``/proc/cpuinfo``; empty where that is absent)."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model or platform.processor() or platform.machine(),
            "isa": [f for f in ISA_FLAGS if f in flags], "cpus": os.cpu_count() or 0,
            "machine": platform.machine()}
