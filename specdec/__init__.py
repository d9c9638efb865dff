"""specdec: a speculative-decoding-centric LLM inference engine (Llama 4 + EAGLE3).

`specdec.Engine` is imported lazily so that light modules (the page allocator, the
sampling parameters) import without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .engine import Engine


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(f"module 'specdec' has no attribute {name!r}")


__all__ = ["Engine", "__version__"]
