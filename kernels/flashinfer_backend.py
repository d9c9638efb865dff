"""FlashInfer attention backend (CUDA only), wired the way SGLang's `flashinfer_backend` is.

The pool [num_slots, Hkv, D] is handed to FlashInfer as a paged cache with page_size 1
(`k_cache.unsqueeze(1)`: [num_pages, 1, Hkv, D], NHD layout), so a request's page indices are
exactly its `kv_slots` and every last page holds one token. One wrapper is planned per
forward and per chunk setting, then run by every layer:

* every request has one query row -> `BatchDecodeWithPagedKVCacheWrapper`. Any visibility of
  a single row (a draft-tree mask row, Llama 4's chunk window) is applied by listing only the
  visible slots as the request's pages.
* otherwise `BatchPrefillWithPagedKVCacheWrapper`:
    - no custom masks, no chunking: `causal=True` (bottom-right aligned, = our causal rule);
    - no custom masks, chunked layer, keys at positions 0..kv_len-1 (prefill / extend):
      every request is split into one "virtual request" per chunk its queries touch, whose
      keys start at that chunk's first position; `causal=True` again (vLLM's
      "local attention virtual batches");
    - custom masks (tree verification, draft trees) or anything else: a flattened boolean
      `custom_mask` (FlashInfer packs it into bits in `plan`) = our visibility mask, chunk
      window included, over the key range [lo, hi) some query of the request can see.

K/V are stored with one index_put per layer (what SGLang's `set_kv_buffer` does).

Every FlashInfer call needs a CUDA GPU: construction fails with a clear message without one.
None of the FlashInfer calls here has ever run (written against flashinfer-python 0.7.2's
API: plan(...) keywords `custom_mask`, `causal`, `sm_scale`, `q_data_type`, `kv_data_type`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .backend import AttentionBackend, AttentionMeta, SeqAttnMeta
from .errors import BackendUnavailable
from .torch_backend import visibility_mask

WORKSPACE_BYTES = 128 * 1024 * 1024  # SGLang's default float workspace


def import_flashinfer() -> Any:
    try:
        return importlib.import_module("flashinfer")
    except Exception as e:  # ImportError, or a broken CUDA install raising at import
        raise BackendUnavailable(
            f"FlashInfer is not importable ({type(e).__name__}: {e}); install the gpu extra "
            "(pip install 'specdec[gpu]') or use --attention-backend triton|torch"
        ) from e


def require_cuda(device: torch.device) -> None:
    if device.type != "cuda" or not torch.cuda.is_available():
        raise BackendUnavailable("FlashInfer needs a CUDA GPU; use --attention-backend torch")


@dataclass(frozen=True)
class _Planned:
    wrapper: Any
    decode: bool


def _i32(values: list[int], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)


def _positions_are_indices(seq: SeqAttnMeta) -> bool:
    """Key i at position i and query j at position kv_len - q_len + j (prefill / extend)."""
    pos = torch.arange(seq.kv_len)
    return bool(torch.equal(seq.kv_positions.cpu(), pos)) and bool(
        torch.equal(seq.q_positions.cpu(), pos[seq.kv_len - seq.q_len :])
    )


def should_use_tensor_cores(num_qo_heads: int, num_kv_heads: int, kv_dtype: torch.dtype) -> bool:
    """SGLang's rule for the decode wrapper: tensor cores pay off for GQA groups > 4 (and fp8)."""
    group = num_qo_heads // num_kv_heads
    return group > 4 or kv_dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


class FlashInferAttentionBackend(AttentionBackend):
    """Paged prefill (custom masks for trees) and paged decode through FlashInfer."""

    name = "flashinfer"

    def __init__(self, device: torch.device | str = "cuda") -> None:
        self.device = torch.device(device)
        require_cuda(self.device)
        self.fi = import_flashinfer()
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self._wrappers: dict[tuple[str, int | None, bool], Any] = {}
        # one forward's metadata (two with hybrid KV: the full layers' and the chunked layers',
        # read alternately layer by layer) and its plans; a new forward's metadata resets them
        self._metas: list[AttentionMeta] = []
        self._planned: dict[tuple[Any, ...], _Planned] = {}

    # ---- wrappers (one per kind and chunk setting: a plan lives inside its wrapper) -------------
    def _wrapper(self, kind: str, chunk_size: int | None, tensor_cores: bool = False) -> Any:
        key = (kind, chunk_size, tensor_cores)
        w = self._wrappers.get(key)
        if w is None:
            if kind == "decode":
                w = self.fi.BatchDecodeWithPagedKVCacheWrapper(
                    self.workspace, "NHD", use_tensor_cores=tensor_cores
                )
            else:
                w = self.fi.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
            self._wrappers[key] = w
        return w

    # ---- planning ----------------------------------------------------------------------------
    def _plan(
        self, meta: AttentionMeta, chunk_size: int | None, q: Tensor, k_cache: Tensor, scale: float
    ) -> _Planned:
        if not any(m is meta for m in self._metas):
            if len(self._metas) >= 2:
                self._metas, self._planned = [], {}
            self._metas.append(meta)
        H, hkv, D = q.shape[1], k_cache.shape[1], k_cache.shape[2]
        key = (id(meta), chunk_size, H, hkv, D, q.dtype, k_cache.dtype, scale)
        planned = self._planned.get(key)
        if planned is None:
            planned = self._planned[key] = self._make_plan(meta, chunk_size, q, k_cache, scale)
        return planned

    def _make_plan(
        self, meta: AttentionMeta, chunk_size: int | None, q: Tensor, k_cache: Tensor, scale: float
    ) -> _Planned:
        dev = q.device
        seqs = meta.seqs
        H, hkv, D = q.shape[1], k_cache.shape[1], k_cache.shape[2]
        row = 0
        for s in seqs:  # FlashInfer's qo_indptr needs the requests packed in order
            if s.q_start != row:
                raise ValueError("FlashInfer needs requests packed in order in the batch")
            row += s.q_len
        common: dict[str, Any] = dict(
            q_data_type=q.dtype, kv_data_type=k_cache.dtype, sm_scale=scale,
            pos_encoding_mode="NONE",
        )
        if all(s.q_len == 1 for s in seqs):
            indices = [self._decode_slots(s, chunk_size) for s in seqs]
            lens = [int(x.shape[0]) for x in indices]
            tc = should_use_tensor_cores(H, hkv, k_cache.dtype)
            w = self._wrapper("decode", chunk_size, tc)
            w.plan(
                _i32(_cumsum(lens), dev),
                torch.cat(indices).to(device=dev, dtype=torch.int32),
                _i32([1] * len(seqs), dev),
                H, hkv, D, 1,
                **common,
            )
            return _Planned(w, decode=True)

        w = self._wrapper("prefill", chunk_size)
        no_masks = all(s.mask is None for s in seqs)
        if no_masks and chunk_size is None:
            qo = [s.q_len for s in seqs]
            slots = [s.kv_slots for s in seqs]
            mask = None
        elif no_masks and all(_positions_are_indices(s) for s in seqs):
            assert chunk_size is not None
            qo, slots = [], []
            for s in seqs:
                for q_lo, q_hi, k_lo in _virtual_chunks(s, chunk_size):
                    qo.append(q_hi - q_lo)
                    slots.append(s.kv_slots[k_lo : s.kv_len - s.q_len + q_hi])
            mask = None
        else:
            qo, slots, masks = [], [], []
            for s in seqs:
                vis = visibility_mask(s, chunk_size)
                if vis is None:  # q_len 1 without mask or chunk: sees everything
                    vis = torch.ones(s.q_len, s.kv_len, dtype=torch.bool)
                cols = vis.any(0).nonzero()
                lo, hi = (int(cols[0]), int(cols[-1]) + 1) if cols.numel() else (0, 1)
                qo.append(s.q_len)
                slots.append(s.kv_slots[lo:hi])
                masks.append(vis[:, lo:hi].flatten())
            mask = torch.cat(masks).to(dev, non_blocking=True)
        kv_lens = [int(x.shape[0]) for x in slots]
        w.plan(
            _i32(_cumsum(qo), dev),
            _i32(_cumsum(kv_lens), dev),
            torch.cat(slots).to(device=dev, dtype=torch.int32),
            _i32([1] * len(qo), dev),
            H, hkv, D, 1,
            custom_mask=mask,
            causal=mask is None,
            **common,
        )
        return _Planned(w, decode=False)

    @staticmethod
    def _decode_slots(seq: SeqAttnMeta, chunk_size: int | None) -> Tensor:
        vis = visibility_mask(seq, chunk_size)  # None or [1, kv_len]
        return seq.kv_slots if vis is None else seq.kv_slots[vis[0]]

    # ---- forward -----------------------------------------------------------------------------
    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        meta: AttentionMeta,
        scale: float,
        chunk_size: int | None,
    ) -> Tensor:
        slots = meta.out_slots.to(k_cache.device, non_blocking=True)
        k_cache[slots] = k.to(k_cache.dtype)
        v_cache[slots] = v.to(v_cache.dtype)
        planned = self._plan(meta, chunk_size, q, k_cache, scale)
        paged = (k_cache.unsqueeze(1), v_cache.unsqueeze(1))  # page_size 1, NHD
        return planned.wrapper.run(q.contiguous(), paged)


def _cumsum(lens: list[int]) -> list[int]:
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return out


def _virtual_chunks(seq: SeqAttnMeta, chunk: int) -> list[tuple[int, int, int]]:
    """Split a causal request whose key i sits at position i into per-chunk pieces:
    (first query, end query, first key). Queries [q_lo, q_hi) lie in one chunk starting at
    key k_lo; with keys [k_lo, c + q_hi) FlashInfer's bottom-right causal rule is exact."""
    c = seq.kv_len - seq.q_len  # cached keys before the first query
    out = []
    q_lo = 0
    while q_lo < seq.q_len:
        pos = c + q_lo
        k_lo = pos - pos % chunk
        q_hi = min(seq.q_len, k_lo + chunk - c)
        out.append((q_lo, q_hi, k_lo))
        q_lo = q_hi
    return out
