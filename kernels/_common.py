"""Small helpers shared by the Triton kernel modules. Imports nothing of triton (it stays lazy)."""
from __future__ import annotations

import importlib.util

__all__ = ["triton_installed", "next_pow2"]


def triton_installed() -> bool:
    """Whether ``import triton`` would find a package (without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["triton"] is None (blocked)
        return False


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``): Triton block shapes must be powers of two."""
    return 1 << max(0, int(n) - 1).bit_length()
