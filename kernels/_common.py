"""Small helpers shared by the Triton kernel modules. Imports nothing of triton (it stays lazy)."""
from __future__ import annotations

import importlib.util
import os

__all__ = ["triton_installed", "next_pow2", "HAVE_TRITON", "available", "lazy_jit", "bind_triton"]


def triton_installed() -> bool:
    """Whether ``import triton`` would find a package (without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["triton"] is None (blocked)
        return False


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``): Triton block shapes must be powers of two."""
    return 1 << max(0, int(n) - 1).bit_length()


HAVE_TRITON = triton_installed()


def available() -> bool:
    """True when triton imports and there is a CUDA device or ``TRITON_INTERPRET=1`` (CPU interpreter)."""
    import torch

    if not HAVE_TRITON:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


_JITTED = {}


def lazy_jit(fn, triton_module, **kw):
    """``triton.jit(fn)`` on first use, cached per function and interpreter mode: kernels are decorated lazily,
    so whether they run under the CPU interpreter follows ``TRITON_INTERPRET`` at the first *call*, not at
    import (another module may import a kernel module before a test sets the variable). The caller passes the
    triton module after binding its own module-level ``tl``, which the kernel bodies resolve at compile time."""
    key = (fn.__module__, fn.__qualname__, os.environ.get("TRITON_INTERPRET") == "1")
    kern = _JITTED.get(key)
    if kern is None:
        kern = _JITTED[key] = triton_module.jit(**kw)(fn)
    return kern


def bind_triton(namespace: dict):
    """Import triton on first use and bind ``triton`` and ``tl`` (``triton.language``) in a kernel module's
    globals (pass ``globals()``): kernel bodies resolve ``tl`` there when they are compiled. Returns triton."""
    if namespace.get("triton") is None:
        import triton
        import triton.language as tl

        namespace["triton"], namespace["tl"] = triton, tl
    return namespace["triton"]
