"""Which float precision training runs in, chosen from what the machine computes natively.

bf16 autocast only pays where the hardware has bf16 arithmetic: CPUs with AMX or AVX512_BF16,
and CUDA GPUs of compute capability 8.0 or later. Elsewhere PyTorch emulates it: on a 2-core
AMD EPYC with AVX2 only, a 20-step SFT of builtin:tiny-base took 64.7 s in bf16 and 3.7 s in
fp32 (17x). So ``bf16: auto`` (every training stage's default) turns it on only where it is
native, and the resolved value is what the settings, and so the manifest, record.

``POLM_BF16=0`` / ``=1`` overrides what ``auto`` resolves to (not an explicit true / false):
it runs the test suite at the other precision on the machine you have.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Literal

# The CPU flags (as /proc/cpuinfo names them) under which bf16 matmuls run natively.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
ENV = "POLM_BF16"

Bf16 = bool | Literal["auto"]


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The first processor's flags (an empty set where /proc/cpuinfo is not there)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):  # x86 / Arm
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in NATIVE_BF16_FLAGS)


# Device files a CUDA (or ROCm, or WSL GPU) driver creates: where none exists, torch cannot see a
# GPU, and `auto` is settled from the CPU's flags without importing torch (2.5 s of a `polm
# validate` that checks settings and loads nothing).
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg")


def may_have_gpu() -> bool:
    return "torch" in sys.modules or any(os.path.exists(f) for f in GPU_DEVICE_FILES)


@functools.cache
def native_bf16() -> bool:
    """True where training would run on hardware that computes bf16 natively: a bf16-capable
    CUDA GPU when one is present (trainers use it then), else the CPU's flags."""
    if not may_have_gpu():
        return cpu_has_native_bf16()
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def resolve_bf16(value: Bf16) -> bool:
    """``value`` itself when it is a bool; for ``"auto"``, POLM_BF16 if set, else whether the
    machine computes bf16 natively."""
    if isinstance(value, bool):
        return value
    if value != "auto":
        raise ValueError(f"bf16 must be true, false or auto, got {value!r}")
    env = os.environ.get(ENV, "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    if env:
        raise ValueError(f"{ENV} must be 0 or 1, got {os.environ[ENV]!r}")
    return native_bf16()
