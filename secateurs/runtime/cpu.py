"""The host CPU as ``/proc/cpuinfo`` describes it: its model name and instruction-set flags.
ONNX Runtime's CPU kernels differ by instruction set (int8 is fast and exact only with VNNI or
AMX; MLAS's NCHWc block is 8 channels on AVX2, 16 on AVX-512), so the int8 defaults and the
benchmarks' records read it here."""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass


@dataclass(frozen=True)
class CpuInfo:
    model: str  # "model name"; the platform's processor or machine where absent
    flags: frozenset[str]  # empty where /proc/cpuinfo is absent (not Linux)
    machine: str  # platform.machine(), e.g. "x86_64"


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """The first CPU's model name and flags (all CPUs of a host share them)."""
    model, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = frozenset(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return CpuInfo(model or platform.processor() or platform.machine(), flags,
                   platform.machine())
