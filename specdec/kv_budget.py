"""How many KV slots each pool gets: the memory budget (`--mem-fraction-static`, or a share of
free memory), the KV dtype (`--kv-cache-dtype`) and the hybrid layout (`--swa-full-tokens-ratio`).

One pool (dense models, or `--disable-hybrid-swa-memory`): every layer keeps every position, so
a slot costs `all layers + draft` K/V and the pool holds `budget / that` tokens.

Hybrid (models with chunked-attention layers, SGLang's "SWA" memory): the full layers (NoPE and
the EAGLE3 draft's) keep every position in the full pool; the chunked layers keep only each
request's current window in a pool of `ratio x full` slots. The budget is split so that
`full x full_bytes + ratio x full x swa_bytes = budget`. A single request's context is bounded by
the full pool alone once the window pool holds one request's window, which is why hybrid KV
reaches a longer context in the same memory (3 of 4 layers chunked: up to 4x at a small ratio).

Pure Python (no torch), like the allocator.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KVLayout", "KVPlan", "plan_kv", "static_kv_budget"]


@dataclass(frozen=True, slots=True)
class KVLayout:
    """What one KV slot costs, per pool."""

    full_layer_bytes: int  # K + V bytes of one position, summed over the full pool's layers
    swa_layer_bytes: int  # the same over the chunked layers in the window pool (0: one pool)
    page_size: int
    window_tokens: int = 0  # slots one request's window can need at once (hybrid only)

    @property
    def hybrid(self) -> bool:
        return self.swa_layer_bytes > 0


@dataclass(frozen=True, slots=True)
class KVPlan:
    full_tokens: int  # slots of the full pool (every position of every request)
    swa_tokens: int  # slots of the window pool (0: one pool)
    raised_swa: bool = False  # the ratio gave fewer window slots than one request needs

    def bytes(self, layout: KVLayout) -> tuple[int, int]:
        """(full pool bytes, window pool bytes)."""
        return self.full_tokens * layout.full_layer_bytes, self.swa_tokens * layout.swa_layer_bytes


def _floor_pages(tokens: float, page_size: int) -> int:
    return int(tokens) // page_size * page_size


def plan_kv(layout: KVLayout, ratio: float, budget_bytes: int | None = None,
            max_total_tokens: int | None = None) -> KVPlan:
    """Pool sizes from a byte budget or from `--max-total-tokens` (the full pool's slots, as in
    SGLang). The window pool is `ratio x full` slots, raised to one request's window when that is
    more (a budget then pays for it out of the full pool)."""
    if (budget_bytes is None) == (max_total_tokens is None):
        raise ValueError("pass exactly one of budget_bytes and max_total_tokens")
    if ratio <= 0:
        raise ValueError(f"swa_full_tokens_ratio must be > 0; got {ratio}")
    ps = layout.page_size
    need = -(-layout.window_tokens // ps) * ps
    if max_total_tokens is not None:
        full = _floor_pages(max_total_tokens, ps)
    else:
        assert budget_bytes is not None
        per_full = layout.full_layer_bytes + (ratio * layout.swa_layer_bytes if layout.hybrid else 0)
        full = _floor_pages(budget_bytes / per_full, ps)
    if full < ps:
        raise ValueError(f"the KV cache holds {full} tokens: less than one page of {ps}")
    if not layout.hybrid:
        return KVPlan(full, 0)
    swa = _floor_pages(ratio * full, ps)
    if swa >= need:
        return KVPlan(full, swa)
    if budget_bytes is not None:  # the window pool takes one window; the full pool gets the rest
        full = _floor_pages((budget_bytes - need * layout.swa_layer_bytes) / layout.full_layer_bytes, ps)
        if full < ps:
            raise ValueError(f"a KV budget of {budget_bytes} bytes cannot hold one request's attention window "
                             f"({need} tokens in the chunked layers' pool) and a page of the full pool")
    return KVPlan(full, need, raised_swa=True)


def static_kv_budget(mem_fraction_static: float, total_bytes: int, free_bytes: int) -> int:
    """SGLang's `--mem-fraction-static`: weights plus KV may take this fraction of the device's
    memory. The weights are loaded already, so the KV gets what is free beyond the part kept back
    (`total x (1 - fraction)`)."""
    if not 0 < mem_fraction_static < 1:
        raise ValueError(f"--mem-fraction-static must be in (0, 1); got {mem_fraction_static}")
    budget = free_bytes - int(total_bytes * (1.0 - mem_fraction_static))
    if budget <= 0:
        raise ValueError(
            f"--mem-fraction-static {mem_fraction_static} leaves no memory for the KV cache: "
            f"{free_bytes / 2**30:.1f} GiB free of {total_bytes / 2**30:.1f} GiB after loading the weights, "
            f"{total_bytes * (1.0 - mem_fraction_static) / 2**30:.1f} GiB kept back; raise it or pass --max-total-tokens"
        )
    return budget
