"""Compile every Triton kernel for a real GPU target without a GPU (dev tool).

    python -m specdec.kernels.triton_compile_check [--arch 80 90] [--dtype bf16 fp16 fp32]
        [--head-dim 64 128] [--ptxas]

Triton's CUDA backend runs on the CPU: Python AST -> TTIR -> TTGIR -> LLVM IR -> PTX, then
the ptxas bundled in the triton wheel -> cubin. This proves the kernels compile (the
interpreter tests prove they compute the right thing); `--ptxas` also prints registers,
spills and shared memory per kernel (`ptxas -v`). It cannot run anything: no driver.
Takes a minute or more per (arch, dtype, head_dim) on a busy CPU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)  # before the kernel modules: build for a GPU

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import triton_attention as ta
from . import triton_kv_store as ts
from . import triton_moe as tm

INT32_PTRS = {"seq_info", "work", "kv_pos", "q_pos", "mask_bits", "sorted_ids", "tile_expert"}


def _signature(fn: Any, consts: dict[str, Any], type_of: Callable[[str], str]) -> dict[str, str]:
    return {name: "constexpr" if name in consts else type_of(name) for name in fn.arg_names}


def _types(dt: str) -> Callable[[str], str]:
    def type_of(name: str) -> str:
        if name in ("Mid_O", "Mid_L", "Score"):
            return "*fp32"
        if name in ("kv_slots", "out_slots"):
            return "*i64"
        if name in INT32_PTRS:
            return "*i32"
        if name == "qk_scale":
            return "fp32"
        if name[0].isupper() and name not in ("T", "INTER", "HIDDEN"):
            return "*" + dt  # tensors: Q, K, V, K_cache, V_cache, Out, X, W13, W2, Inter
        return "i32"

    return type_of


def jobs(dt: str, d: int, arch: int) -> list[tuple[Any, dict[str, Any], int, int]]:
    """(kernel, constexprs, num_warps, num_stages) as the launchers pick them."""
    torch_dt = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dt]
    import torch

    dtype = getattr(torch, torch_dt)
    bm_cap, bn, warps = ta.extend_config(dtype, d, arch)
    dn, dwarps = ta.decode_config(dtype, d)
    block_d = max(16, triton.next_power_of_2(d))
    prec = "ieee" if dt == "fp32" else "tf32"
    common = dict(HEAD_DIM=d, BLOCK_D=block_d, HAS_CHUNK=True, HAS_MASK=True, UPCAST=False,
                  DOT_PREC=prec, NUM_FIELDS=ta.NUM_FIELDS)
    group = 4
    return [
        (ta._extend_attn_kernel,
         dict(common, GROUP=group, QPB=bm_cap // group, BLOCK_M=bm_cap, BLOCK_N=bn), warps, 2),
        (ta._decode_attn_kernel,
         dict(common, GROUP=group, NUM_SPLITS=4, BLOCK_H=16, BLOCK_N=dn), dwarps, 2),
        (ta._decode_merge_kernel,
         dict(HEAD_DIM=d, NUM_SPLITS=4, NUM_FIELDS=ta.NUM_FIELDS, BLOCK_S=4, BLOCK_D=block_d), 1, 2),
        (ts._store_kv_kernel, dict(HEAD_DIM=d, ROW=8 * d, BLOCK_T=2, BLOCK_R=8 * block_d), 4, 2),
        (tm._moe_gate_up_kernel,
         dict(BLOCK_M=64, BLOCK_N=tm.moe_block_n(dtype), BLOCK_K=32, UPCAST=False, DOT_PREC=prec), 4, 2),
        (tm._moe_down_kernel,
         dict(BLOCK_M=64, BLOCK_N=tm.moe_block_n(dtype), BLOCK_K=32, UPCAST=False, DOT_PREC=prec), 4, 2),
    ]


def _ptxas_report(ptx: str, arch: int) -> str:
    try:  # the ptxas triton itself uses for this arch (a newer one from sm_90 on)
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
    except (ImportError, AttributeError):
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        r = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                           capture_output=True, text=True, check=False)
    finally:
        os.unlink(f.name)
    info = [ln.split("info    :")[-1].strip() for ln in r.stderr.splitlines()
            if "Used" in ln or "spill" in ln]
    return "; ".join(info) or r.stderr.strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp16", "fp32"], choices=["bf16", "fp16", "fp32"])
    p.add_argument("--head-dim", type=int, nargs="+", default=[128])
    p.add_argument("--ptxas", action="store_true", help="print registers / spills (ptxas -v)")
    args = p.parse_args(argv)
    if ta.TritonAttentionBackend.interpreted():
        sys.exit("the kernels were imported under TRITON_INTERPRET=1; run this in a fresh process")
    failures = 0
    for arch in args.arch:
        target = GPUTarget("cuda", arch, 32)
        for dt in args.dtype:
            for d in args.head_dim:
                for fn, consts, warps, stages in jobs(dt, d, arch):
                    t0 = time.perf_counter()
                    try:
                        k = triton.compile(ASTSource(fn, _signature(fn, consts, _types(dt)), consts),
                                           target=target, options={"num_warps": warps, "num_stages": stages})
                    except Exception as e:
                        failures += 1
                        print(f"FAIL sm_{arch} {dt} D={d} {fn.__name__}: {type(e).__name__}: {e}")
                        continue
                    line = (f"ok   sm_{arch} {dt} D={d} {fn.__name__}: {time.perf_counter() - t0:.1f}s, "
                            f"shared {k.metadata.shared} B")
                    if args.ptxas:
                        line += " | " + _ptxas_report(k.asm["ptx"], arch)
                    print(line, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
