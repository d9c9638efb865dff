"""Running the Triton kernels in Triton's CPU interpreter (`TRITON_INTERPRET=1`, tests only).

`@triton.jit` picks compiled or interpreted functions when a function is decorated. The
kernel modules are imported after `TRITON_INTERPRET=1` is set, but Triton's own `@jit`
helpers (`tl.max`, `tl.sum`, `tl.cdiv`, `tl.sigmoid`, ...) were decorated when triton was
first imported, and transformers imports triton early. Compiled helpers cannot be called
from an interpreted kernel, so `adopt_interpreter` rewraps them for the interpreter. Only
ever done when the interpreter is on.
"""

from __future__ import annotations

import os
import sys

_TRUE = ("1", "true", "on", "yes")


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def adopt_interpreter() -> int:
    """Replace compiled `@jit` helpers of `triton.language.*` with interpreted ones; returns
    how many were replaced (0 when triton was imported with the interpreter already on)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    done: dict[int, InterpretedFunction] = {}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "triton.language" or name.startswith("triton.language.")):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                fn = done.get(id(value))
                if fn is None:
                    fn = done[id(value)] = InterpretedFunction(value.fn)
                setattr(module, attr, fn)
    return len(done)
