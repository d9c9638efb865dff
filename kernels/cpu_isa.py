"""Which tier of specdec's CPU kernels this machine runs, decided once per process.

A tier is a set of x86 instruction-set extensions and the compiler flags its build of the C++
extension uses (kernels/cpu_kernels.py builds and caches one extension per tier, so a build made
for one tier is never loaded on a CPU that lacks it):

    amx     AVX-512 (F/BW/VL/DQ/VNNI) + AMX tiles (TILE, INT8)  Intel Xeon 4th gen and later
    avx512  AVX-512 F/BW/VL/DQ/VNNI                              Intel Xeon, AMD Zen 4 and later
    avx2    AVX2 + FMA + F16C                                    x86-64 since ~2013
    none    no extension: PyTorch's own ops                      any CPU

`SPECDEC_CPU_ISA=amx|avx512|avx2|none` forces a tier (refused with `IsaUnavailable` when this CPU
lacks it or the tier has no kernels yet); unset or `auto` takes the best tier the CPU and the
implemented kernels share. `SPECDEC_NO_CPU_KERNELS=1` is the older spelling of `none`.

This module imports no torch: it reads /proc/cpuinfo and, for AMX, asks Linux for permission to
use the tile registers (arch_prctl ARCH_REQ_XCOMP_PERM; without it the first tile instruction
kills the process).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from pathlib import Path

ENV = "SPECDEC_CPU_ISA"
DISABLE_ENV = "SPECDEC_NO_CPU_KERNELS"
ISAS = ("amx", "avx512", "avx2", "none")  # best first

_AVX2 = frozenset({"avx2", "fma", "f16c"})
_AVX512 = _AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}
_AMX = _AVX512 | {"amx_tile", "amx_int8"}
REQUIRED_FLAGS: dict[str, frozenset[str]] = {"amx": _AMX, "avx512": _AVX512, "avx2": _AVX2,
                                             "none": frozenset()}
# gcc/clang flags of each tier's build (SPECDEC_ISA_<TIER> names the tier, SPECDEC_AVX512 says
# 512-bit vectors are there: kernels/csrc pick their code paths by these macros)
COMPILE_FLAGS: dict[str, tuple[str, ...]] = {
    "avx2": ("-mavx2", "-mfma", "-mf16c", "-DSPECDEC_ISA_AVX2"),
    "avx512": ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
               "-mavx512vnni", "-DSPECDEC_ISA_AVX512", "-DSPECDEC_AVX512"),
    "amx": ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
            "-mavx512vnni", "-mamx-tile", "-mamx-int8", "-DSPECDEC_ISA_AMX", "-DSPECDEC_AVX512"),
}
# tiers whose kernels exist (a tier is offered only once its kernels are written and tested)
IMPLEMENTED = ("amx", "avx512", "avx2", "none")


class IsaUnavailable(ValueError):
    """A forced tier this machine (or this build of specdec) cannot run."""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of this (Linux) machine, as /proc/cpuinfo spells them; empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def is_x86_64(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("x86_64", "amd64")


@functools.cache
def amx_permitted() -> bool:
    """Ask Linux once for this process's permission to use AMX tile data (process-wide)."""
    if not is_x86_64() or platform.system() != "Linux":
        return False
    sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.syscall(sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata)) == 0
    except (OSError, AttributeError):
        return False


def cpu_isas(flags: frozenset[str] | None = None, machine: str | None = None,
             amx_ok: bool | None = None) -> tuple[str, ...]:
    """Every tier this CPU can run, best first ("none" always)."""
    flags = cpu_flags() if flags is None else flags
    if not is_x86_64(machine):
        return ("none",)
    out = []
    for isa in ISAS[:-1]:
        if REQUIRED_FLAGS[isa] <= flags:
            if isa == "amx" and not (amx_permitted() if amx_ok is None else amx_ok):
                continue  # the kernel refused tile data: using a tile would be SIGILL
            out.append(isa)
    return (*out, "none")


def supported_isas(flags: frozenset[str] | None = None, machine: str | None = None,
                   amx_ok: bool | None = None) -> tuple[str, ...]:
    """The tiers this machine can run *and* specdec has kernels for, best first."""
    return tuple(i for i in cpu_isas(flags, machine, amx_ok) if i in IMPLEMENTED)


def requested_isa(environ: dict[str, str] | None = None) -> str | None:
    """The tier forced by the environment (None: choose automatically)."""
    env = os.environ if environ is None else environ
    if env.get(DISABLE_ENV, "") not in ("", "0"):
        return "none"
    value = env.get(ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in ISAS:
        raise IsaUnavailable(f"{ENV}={env[ENV]!r}: choose one of auto, {', '.join(ISAS)}")
    return value


def choose_isa(requested: str | None, cpu: tuple[str, ...], implemented: tuple[str, ...] = IMPLEMENTED) -> str:
    """The tier to run: the requested one if the CPU has it and its kernels exist (else
    `IsaUnavailable` naming why), or the best tier both allow."""
    if requested is None:
        return next(i for i in cpu if i in implemented)
    if requested not in cpu:
        lacking = sorted(REQUIRED_FLAGS[requested] - cpu_flags()) if is_x86_64() else ["x86-64"]
        why = f"lacks {', '.join(lacking)}" if lacking else "refused AMX tile data (arch_prctl)"
        raise IsaUnavailable(f"{ENV}={requested}: this CPU {why}; it runs {', '.join(cpu)}")
    if requested not in implemented:
        raise IsaUnavailable(f"{ENV}={requested}: specdec has no {requested} kernels yet; "
                             f"choose one of {', '.join(i for i in cpu if i in implemented)}")
    return requested
