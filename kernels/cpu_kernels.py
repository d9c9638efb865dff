"""specdec's CPU kernels (kernels/csrc/*.cpp), each beside its torch reference.

One C++ extension per CPU tier (kernels/cpu_isa.py: amx, avx512, avx2; `none` means no
extension), built on first use with torch's extension loader (gcc + ninja; about two minutes
once per tier on 2 cores, then cached under ~/.cache/torch_extensions as `specdec_cpu_kernels_<tier>`, compiled
with that tier's flags only, so a build is never loaded on a CPU that lacks its tier):

* `w8_linear(x, w, scale, bias, act_bits=16)`: int8-weight linear: float32 activations in and
  out, quantised inside per block of `act_block(Kp)` k to int16 codes (act_bits 16, w8a16) or
  int8 codes (act_bits 8, w8a8_int8: one VNNI product per 4 k on avx512/amx) for integer dot
  products; int8 weights in the tier's layout (`pack_w8`, any K: zero columns pad it to a
  multiple of 64), float32 [N] scales. Reference: `w8_linear_reference` (float64, on the
  logical weights and the same activation codes).
* `w4_linear(x, wq, ws, n, bias)`: weight-only int4 in llama.cpp's Q4_1 arrangement (groups of
  32 along K, float16 scale and low per group), same int16 activations; weights in `pack_w4`'s
  layout. Reference: `w4_linear_reference`.
* `rms_norm(x, weight, eps)`: float32 RMSNorm in one call. Reference: `rms_norm_reference`.
* `paged_attention(q, k_cache, v_cache, slots, mask, scale)`: a few float32 queries over keys
  gathered from the paged pool (decode and tree verification). Reference:
  `paged_attention_reference`.
* `top_logprobs(logits, k)`: the k best log-softmax values of each float32 row and their
  indices, best first (EAGLE3 tree drafting's children of every frontier node). Reference:
  `top_logprobs_reference`.
* `argmax_rows(logits)`: torch.argmax of each float32 row (greedy decoding and verification).
* `truncated_probs(scaled, top_k, top_p, min_p)`: the sampled distribution of each row of
  temperature-scaled logits after top-k, top-p and min-p, without sorting the row. Reference:
  `truncated_probs_reference` (HF's and vLLM's rules, by a full sort).
* `race_rows(probs, seeds)`: one exponential race per row, E from a counter-based generator
  seeded per row. Reference: `race_rows_reference` (numpy).
* `decoder_layer(...)`: a whole dense Llama layer (norms, int8 or float32 linears, RoPE, KV
  store, attention, SiLU MLP, residuals) in one call. Reference: the module path
  (`DecoderLayer.forward`), compared in tests/test_cpu_kernels.py.

`active_isa()` is the tier in use (decided once per process: `SPECDEC_CPU_ISA` or the best the
CPU allows); `extension()` returns its compiled module, or None for `none` (no AVX2, not x86, no
compiler, SPECDEC_NO_CPU_KERNELS=1): callers then use PyTorch's ops, and quantised weights are
dequantised per product. The reason is logged once.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from . import cpu_isa
from .cpu_isa import IsaUnavailable

log = logging.getLogger("specdec")

CSRC = Path(__file__).parent / "csrc"
_COMMON = (CSRC / "bind.cpp", CSRC / "quantise.cpp", CSRC / "cpu_ops.cpp", CSRC / "decoder_layer.cpp",
           CSRC / "top_logprobs.cpp", CSRC / "argmax_rows.cpp", CSRC / "sampling.cpp")
# each tier's build: the common sources and its int8 and int4 kernels (the amx build's macro adds
# AMX tiles to the int8 one)
_AVX512 = (*_COMMON, CSRC / "w8_linear_avx512.cpp", CSRC / "w4_linear_avx512.cpp")
SOURCES = {"avx2": (*_COMMON, CSRC / "w8_linear.cpp", CSRC / "w4_linear.cpp"),
           "avx512": _AVX512,
           "amx": _AVX512}
HEADERS = (CSRC / "cpu_kernels.h", CSRC / "simd.h", CSRC / "tile_driver.h")
DISABLE_ENV = cpu_isa.DISABLE_ENV
NO_MASK = torch.empty(0, dtype=torch.bool)  # `mask` argument meaning "causal by index"


def toolchain_problem() -> str | None:
    """Why no extension can be built here (no compiler, no ninja), or None."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler on PATH"
    if shutil.which("ninja") is None:
        venv_bin = Path(sys.executable).parent  # pip's ninja lands next to the interpreter
        if not (venv_bin / "ninja").exists():
            return "ninja is not on PATH (pip install ninja)"
        os.environ["PATH"] = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"
    return None


def _headers_hash() -> str:
    digest = hashlib.sha1()
    for header in HEADERS:
        digest.update(header.read_bytes())
    return digest.hexdigest()[:12]


@functools.cache
def sources_hash(isa: str) -> str:
    """A digest of one tier's kernel sources and headers (what its timings depend on)."""
    digest = hashlib.sha1(_headers_hash().encode())
    for source in SOURCES.get(isa, ()):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


def build(isa: str) -> ModuleType:
    """Build (or load the cached build of) one tier's extension; raises on a build error."""
    if isa not in cpu_isa.COMPILE_FLAGS:
        raise IsaUnavailable(f"there is no extension for tier {isa!r}")
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name=f"specdec_cpu_kernels_{isa}",
        sources=[str(p) for p in SOURCES[isa]],
        # torch rebuilds when sources or flags change; the headers' hash is in the flags
        extra_cflags=["-O3", *cpu_isa.COMPILE_FLAGS[isa], "-fopenmp", "-fvisibility=hidden",
                      f"-DSPECDEC_HEADERS={_headers_hash()}"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


@functools.cache
def _resolve() -> tuple[str, ModuleType | None, str | None]:
    """(tier, its module or None, why a better tier was not used), decided once."""
    requested = cpu_isa.requested_isa()  # raises on a bad SPECDEC_CPU_ISA
    isa = cpu_isa.choose_isa(requested, cpu_isa.cpu_isas())  # raises on a tier the CPU lacks
    if isa == "none":
        why = "forced" if requested == "none" else "this CPU has no tier specdec has kernels for"
        return "none", None, why
    problem = toolchain_problem()
    if problem is not None:
        if requested is not None:
            raise IsaUnavailable(f"{cpu_isa.ENV}={isa}: cannot build its kernels: {problem}")
        return "none", None, problem
    candidates = [isa] if requested is not None else [
        i for i in cpu_isa.supported_isas() if i != "none" and cpu_isa.ISAS.index(i) >= cpu_isa.ISAS.index(isa)]
    first_error: str | None = None
    for candidate in candidates:
        try:
            return candidate, build(candidate), first_error
        except Exception as exc:  # a broken toolchain must not stop the server
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if requested is not None:
                raise IsaUnavailable(f"{cpu_isa.ENV}={candidate}: its kernels failed to build: {msg}") from exc
            log.warning("could not build specdec's %s CPU kernels (%s)", candidate, msg)
            first_error = first_error or f"the {candidate} build failed: {msg}"
    return "none", None, first_error


def active_isa() -> str:
    """The CPU kernel tier this process runs: amx, avx512, avx2 or none."""
    return _resolve()[0]


@functools.cache
def extension() -> ModuleType | None:
    """The active tier's compiled kernels (built once per machine and tier); None for `none`."""
    isa, module, why = _resolve()
    if module is None:
        log.info("specdec's CPU kernels are off (PyTorch ops are used instead): %s", why)
    else:
        log.info("specdec's CPU kernels: %s", isa)
    return module


def unsupported_reason() -> str | None:
    """Why no extension is in use, or None when one is."""
    _, module, why = _resolve()
    return None if module is not None else why


K_ALIGN = 64  # packed weights are zero-padded along K to a multiple of this (csrc/cpu_kernels.h)
W4_GROUP = 32  # k per scale of the int4 weights, and per activation scale of the int4 kernel
# output channels per tile of each tier's int8 and int4 layouts
W8_TILE = {"avx2": 8, "avx512": 16, "amx": 16}
W4_TILE = {"avx2": 8, "avx512": 16, "amx": 16}


def padded_k(k: int) -> int:
    """K rounded up to a multiple of 64: the packed weights' width (zero columns)."""
    return -(-k // K_ALIGN) * K_ALIGN


def act_block(kp: int, act_bits: int = 16) -> int:
    """k per activation scale of the int8 kernel for packed width `kp`: for int16 codes the
    largest of 256, 192, 128, 64 that divides it, for int8 codes (act_bits 8) 64
    (csrc/cpu_kernels.h: act_block)."""
    if act_bits == 8:
        return K_ALIGN
    return next(b for b in (256, 192, 128, K_ALIGN) if kp % b == 0)


def _pad_k(t: Tensor) -> Tensor:  # [..., K] -> [..., padded_k(K)] with zero columns
    k = t.shape[-1]
    return t if k % K_ALIGN == 0 else torch.nn.functional.pad(t, (0, padded_k(k) - k))


def _pad_n(w: Tensor, tile: int) -> Tensor:  # [N, K] -> [N rounded up to `tile`, K] with zero rows
    n = w.shape[0]
    nt = -(-n // tile) * tile
    return torch.cat([w, w.new_zeros(nt - n, w.shape[1])]) if nt != n else w


def w8_tile(isa: str | None = None) -> int:
    """Output channels per tile of the int8 layout of `isa` (default: the active tier)."""
    isa = active_isa() if isa is None else isa
    if isa not in W8_TILE:
        raise ValueError(f"tier {isa!r} has no packed int8 layout")
    return W8_TILE[isa]


def w4_tile(isa: str | None = None) -> int:
    """Output channels per tile of the int4 layout of `isa` (default: the active tier)."""
    isa = active_isa() if isa is None else isa
    if isa not in W4_TILE:
        raise ValueError(f"tier {isa!r} has no packed int4 layout")
    return W4_TILE[isa]


def pack_w8(w: Tensor, isa: str | None = None) -> Tensor:
    """int8 [N, K] -> the layout of tier `isa`'s int8 kernel (default: the active tier), [Nt, Kp]:
    N rounded up to the tier's tile of channels with zero rows, Kp = `padded_k(K)` with zero
    columns. The kernel takes x [M, K] with the unpadded K.

    * avx2: tiles of 8 channels, each [Kp/2, 8, 2] (a pair of k for each channel): one 16-byte
      load sign-extends to `vpmaddwd`'s eight int16 pairs.
    * avx512, amx: tiles of 16 channels, each [Kp/4, 16, 4] (4 consecutive k of each channel):
      64 bytes are one `vpdpbusd` operand, 16 of them (64 k) one AMX int8 B tile."""
    tile = w8_tile(isa)
    w = _pad_n(_pad_k(w), tile)
    n, K = w.shape
    group = 2 if tile == 8 else 4  # k per channel in one run
    tiles = w.view(n // tile, tile, K // group, group).transpose(1, 2)  # [tiles, K/group, tile, group]
    return tiles.contiguous().view(n, K)


def unpack_w8(packed: Tensor, n: int, k: int | None = None, isa: str | None = None) -> Tensor:
    """Inverse of `pack_w8`: the first `n` logical rows and `k` columns (default: all), int8."""
    tile = w8_tile(isa)
    nt, K = packed.shape
    group = 2 if tile == 8 else 4
    tiles = packed.view(nt // tile, K // group, tile, group).transpose(1, 2)  # [tiles, tile, K/group, group]
    return tiles.contiguous().view(nt, K)[:n, : K if k is None else k]


def _kernels(what: str) -> ModuleType:
    kernel = extension()
    if kernel is None:
        raise RuntimeError(f"the {what} kernel is unavailable: {unsupported_reason()}")
    return kernel


def w8_linear(x: Tensor, w: Tensor, scale: Tensor, bias: Tensor | None = None, act_bits: int = 16) -> Tensor:
    """x [M, K] float32, w int8 *packed* (`pack_w8`), scale [N] float32 -> [M, N] float32;
    activations as int16 (act_bits 16) or int8 (8) codes per block."""
    empty = x.new_empty(0)
    return _kernels("int8").w8_linear(x.contiguous(), w, scale, empty if bias is None else bias.float(), act_bits)


def top_logprobs(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """logits [R, V] float32 -> (log-probabilities [R, k], indices [R, k] int64), best first
    (equal logits: the smaller index first); PyTorch's ops where the kernels are off."""
    k = min(k, logits.shape[-1])
    kernel = extension()
    if kernel is None or logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.ndim != 2:
        return top_logprobs_reference(logits, k)
    vals, idx = kernel.top_logprobs(logits.contiguous(), k)
    return vals, idx


def argmax_rows(logits: Tensor) -> Tensor:
    """logits [R, V] -> int64 [R]: torch.argmax(logits, dim=-1) (equal maxima: the smallest index;
    a NaN: the first one), with the kernel on float32 CPU rows."""
    kernel = extension()
    if (kernel is None or logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.ndim != 2
            or logits.shape[-1] == 0):
        return logits.argmax(dim=-1)
    out: Tensor = kernel.argmax_rows(logits.contiguous())
    return out


def truncated_probs(scaled: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor) -> Tensor:
    """scaled [S, V] (logits / temperature), top_k [S] int64 (>= V or <= 0: no cut), top_p [S]
    float32 in (0, 1], min_p [S] float32 in [0, 1] -> probabilities [S, V] float32: the softmax over
    the top_k largest, cut to the smallest most-likely set whose mass reaches top_p, then below
    min_p times the top probability, renormalised. The kernel on float32 CPU rows (it sums in
    float64: where a token's mass before it is within ~1e-6 of top_p it may keep one token more
    or less than the reference's float32 running sum), else the reference."""
    kernel = extension()
    if kernel is None or scaled.dtype != torch.float32 or scaled.device.type != "cpu" or scaled.ndim != 2:
        return truncated_probs_reference(scaled, top_k, top_p, min_p)
    out: Tensor = kernel.truncated_probs(scaled.contiguous(), top_k.long().contiguous(),
                                         top_p.float().contiguous(), min_p.float().contiguous())
    return out


def truncated_probs_reference(scaled: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor) -> Tensor:
    """`truncated_probs` by a full sort of each row (HF's and vLLM's order: top-k, top-p on the
    top-k renormalised probabilities, min-p; the most likely token always stays)."""
    vocab_size = scaled.shape[-1]
    top_k = torch.where((top_k > 0) & (top_k < vocab_size), top_k, vocab_size).unsqueeze(1)  # [S, 1]
    top_p, min_p = top_p.float().unsqueeze(1), min_p.float().unsqueeze(1)  # [S, 1]
    sorted_logits, sorted_idx = scaled.sort(dim=-1, descending=True)  # [S, V] each
    rank = torch.arange(vocab_size, device=scaled.device).unsqueeze(0)  # [1, V]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k, float("-inf"))
    sorted_probs = torch.softmax(sorted_logits, dim=-1)  # [S, V]
    # probability mass strictly before each rank; a token is needed while the tokens before it
    # have not yet reached top_p
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # [S, V]
    drop = (mass_before >= top_p) & (top_p < 1.0)  # [S, V]
    drop |= sorted_probs < min_p * sorted_probs[:, :1]
    drop[:, 0] = False
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    return torch.zeros_like(sorted_probs).scatter_(-1, sorted_idx, sorted_probs)


def race_rows(probs: Tensor, seeds: Tensor) -> Tensor:
    """probs [B, V] (non-negative, each row with some weight), seeds [B] int64 -> int64 [B]: per
    row argmax_i p_i / E_i, E_i = -ln U_i with U_i from splitmix64 of (seed, i): token i with
    probability p_i / sum p, each token judged by its own key. The kernel on float32 CPU rows,
    else the reference."""
    kernel = extension()
    if kernel is None or probs.dtype != torch.float32 or probs.device.type != "cpu" or probs.ndim != 2:
        return race_rows_reference(probs, seeds)
    out: Tensor = kernel.race_rows(probs.contiguous(), seeds.long().contiguous())
    return out


def race_uniforms_reference(seed: int, n: int) -> Any:
    """U_0 .. U_{n-1} of `race_rows` for one seed (numpy uint64 arithmetic wraps as C++'s does)."""
    import numpy as np

    with np.errstate(over="ignore"):
        x = np.uint64(seed % 2**64) + np.arange(n, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return ((x >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 9007199254740992.0)


def race_rows_reference(probs: Tensor, seeds: Tensor) -> Tensor:
    import numpy as np

    out = []
    for row, seed in zip(probs.double().cpu().numpy(), seeds.tolist(), strict=True):
        if not (row > 0).any():
            raise ValueError("race_rows: a row has no positive weight")
        u = race_uniforms_reference(int(seed), row.shape[0])
        with np.errstate(divide="ignore"):
            key = np.where(row > 0, row / -np.log(u), -np.inf)
        out.append(int(np.argmax(key)))
    return torch.tensor(out, dtype=torch.long, device=probs.device)


def top_logprobs_reference(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    vals, idx = torch.topk(torch.log_softmax(logits.float(), dim=-1), min(k, logits.shape[-1]), dim=-1)
    return vals, idx


def pack_w4(q: Tensor, scale: Tensor, low: Tensor, isa: str | None = None) -> tuple[Tensor, Tensor]:
    """Codes q [N, K] in 0..15 with w = scale * q + low per group of 32 along K (scale, low
    [N, K/32], K % 64 == 0: pad the weight before quantising) -> tier `isa`'s (default: the
    active tier's) int4 layout: wq uint8 [Nt, K/2], ws float16 [Nt/t, K/32, 2, t] with t =
    `w4_tile(isa)` channels per tile (8 on avx2, 16 on avx512/amx) and Nt = N rounded up to t.
    Per tile and 4 k: 2t bytes, byte 2c + j = q[c, k + j] | q[c, k + 2 + j] << 4 (j = 0, 1): on
    avx2 the low nibbles are `pack_w8`'s (k, k+1) pair group and the high ones the (k+2, k+3)
    group; on avx512 one zero-extension gives `vpdpwssd` the pairs of 16 channels."""
    N, K = q.shape
    if K % K_ALIGN:
        raise ValueError(f"int4 codes must be {K_ALIGN}-aligned along K, got K={K} (pad the weight first)")
    tile = w4_tile(isa)
    qt = _pad_n(q.to(torch.uint8), tile)
    nt = qt.shape[0]
    qv = qt.view(nt // tile, tile, K // 4, 2, 2)  # [tiles, c, k/4, (k | k+2), j]
    byte = qv[:, :, :, 0, :] | (qv[:, :, :, 1, :] << 4)  # [tiles, c, k/4, j]
    wq = byte.permute(0, 2, 1, 3).contiguous().view(nt, K // 2)
    sl = torch.stack([scale.float(), low.float()])  # [2, N, K/32]
    if nt != N:
        sl = torch.cat([sl, sl.new_zeros(2, nt - N, K // W4_GROUP)], dim=1)
    ws = sl.view(2, nt // tile, tile, K // W4_GROUP).permute(1, 3, 0, 2).to(torch.float16).contiguous()
    return wq, ws


def unpack_w4(wq: Tensor, ws: Tensor, n: int, k: int | None = None, isa: str | None = None) -> Tensor:
    """The float32 [n, k] weight tier `isa`'s kernel multiplies by: scale * q + low (float16 scales)."""
    tile = w4_tile(isa)
    nt, half_k = wq.shape
    K = half_k * 2
    byte = wq.view(nt // tile, K // 4, tile, 2).permute(0, 2, 1, 3)  # [tiles, c, k/4, j]
    q = torch.stack([byte & 0x0F, byte >> 4], dim=3).reshape(nt, K)[:n].float()  # [n, K]: (k | k+2), j
    sl = ws.float().permute(2, 0, 3, 1).reshape(2, nt, K // W4_GROUP)[:, :n]  # [2, n, K/32]
    w = q * sl[0].repeat_interleave(W4_GROUP, 1) + sl[1].repeat_interleave(W4_GROUP, 1)
    return w[:, : K if k is None else k]


def w4_linear(x: Tensor, wq: Tensor, ws: Tensor, n: int, bias: Tensor | None = None) -> Tensor:
    """x [M, K] float32, (wq, ws) from `pack_w4` (K padded to Kp) -> [M, n] float32."""
    return _kernels("int4").w4_linear(x.contiguous(), wq, ws, n, x.new_empty(0) if bias is None else bias.float())


def w4_linear_reference(x: Tensor, wq: Tensor, ws: Tensor, n: int, bias: Tensor | None = None) -> Tensor:
    """The int4 kernel's product in float64: the kernel's int16 activations times `unpack_w4`'s
    weight (+ bias), returned as float32."""
    out = _kernel_activations(x, W4_GROUP) @ unpack_w4(wq, ws, n, x.shape[1]).double().T
    if bias is not None:
        out = out + bias.double()
    return out.float()


def act_qmax(act_bits: int) -> float:
    """The largest activation code: 32767 for int16 codes (act_bits 16), 127 for int8 (8)."""
    if act_bits not in (8, 16):
        raise ValueError(f"act_bits must be 8 or 16, got {act_bits}")
    return 127.0 if act_bits == 8 else 32767.0


def quantize_activations_reference(x: Tensor, block: int | None = None, act_bits: int = 16) -> tuple[Tensor, Tensor]:
    """What the integer kernels do to their input first: float32 [M, K] -> int16 codes [M, Kp]
    and float32 scales [M, Kp/block], q = rint(x * (qmax / amax)) per block of k with qmax =
    `act_qmax(act_bits)` (32767, or 127 for int8 codes) (default block: the int8 kernel's
    `act_block(Kp, act_bits)`; a block with amax <= 1e-30 -> codes and scale 0), K padded with zeros to
    Kp = `padded_k(K)`."""
    x = _pad_k(x)
    M, K = x.shape
    block = act_block(K, act_bits) if block is None else block
    qmax = torch.tensor(act_qmax(act_bits))
    blocks = x.float().view(M, K // block, block)
    amax = blocks.abs().amax(-1, keepdim=True)
    live = amax > 1e-30  # tinier blocks count as zero (qmax / amax would overflow)
    inv = torch.where(live, qmax / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv).clamp(-qmax, qmax).to(torch.int16)
    return q.view(M, K), torch.where(live, amax / qmax, torch.zeros_like(amax)).view(M, K // block)


def _kernel_activations(x: Tensor, block: int | None = None, act_bits: int = 16) -> Tensor:
    """x [M, K] as the integer kernels see it (codes times block scales), float64."""
    q, s = quantize_activations_reference(x, block, act_bits)
    M, K = x.shape
    Kp = q.shape[1]
    nb = s.shape[1]
    return (q.double().view(M, nb, Kp // nb) * s.double()[..., None]).view(M, Kp)[:, :K]


def quantized_activations(x: Tensor, act_bits: int) -> Tensor:
    """x [M, K] float32 rounded to the codes the int8 kernel multiplies (per block of
    `act_block(padded_k(K), act_bits)`), as float32: what a tier without kernels feeds its product."""
    return _kernel_activations(x, None, act_bits).float()


def w8_linear_reference(
    x: Tensor, w: Tensor, scale: Tensor, bias: Tensor | None = None, act_bits: int = 16
) -> Tensor:
    """The kernel's product in float64, on the logical int8 weights w [N, K]: activations
    quantised as the kernel does (`quantize_activations_reference`, int16 or int8 codes), then
    sum_b s_b (q_b . w_b) * scale (+ bias), returned as float32."""
    out = _kernel_activations(x, None, act_bits) @ (w.double() * scale.double()[:, None]).T
    if bias is not None:
        out = out + bias.double()
    return out.float()


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight, in float64, returned as float32."""
    xd = x.double()
    return (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * weight.double()).float()


def paged_attention_reference(
    q: Tensor,  # [T, H, D]
    k_cache: Tensor,  # [S, Hkv, D]
    v_cache: Tensor,
    slots: Tensor,  # [L] int64
    mask: Tensor | None,  # [T, L] bool; None: causal by index
    scale: float,
) -> Tensor:  # [T, H, D] float32
    T, H, _ = q.shape
    L = slots.shape[0]
    keys, values = k_cache[slots].double(), v_cache[slots].double()  # [L, Hkv, D]
    group = H // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    if mask is None:
        mask = torch.arange(L)[None, :] <= (L - T + torch.arange(T))[:, None]
    scores = torch.einsum("thd,lhd->htl", q.double(), keys) * scale
    scores = scores.masked_fill(~mask[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows that see nothing -> zeros
    return torch.einsum("htl,lhd->thd", probs, values).float()
