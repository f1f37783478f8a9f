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


_UNFIT = ("OutOfResources", "CompileTimeAssertionFailure", "PTXASError")


class Tuned:
    """``triton.autotune`` without its per-launch cost: the first launch for a key (every keyword argument, i.e.
    every constexpr the launch passes, plus the dtypes of the tensor arguments: one key per compiled variant, so
    a config chosen for one variant is never reused by another that may not fit) times every ``(num_warps,
    num_stages)`` config with ``triton.testing.do_bench`` and keeps the fastest; every later launch goes
    straight to the JIT function with that config. Triton's ``Autotuner.run`` rebuilds an argument dict and key
    on every call, which on a host-bound step (retention fwd+bwd: four launches in ~1 ms of GPU work) measured
    ~15-35 us per launch on an H200 host. The kernels must be idempotent (they only store), as the timing
    runs them repeatedly.

    Launch as ``Tuned(jit_fn, [(4, 1), (8, 2)])[grid](*runtime_args, **constexprs)``."""

    def __init__(self, fn, configs):
        self.fn, self.configs = fn, list(configs)
        self.best = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def run(self, grid, args, kwargs):
        key = tuple(sorted(kwargs.items())) + tuple(str(a.dtype) for a in args if hasattr(a, "data_ptr"))
        cfg = self.best.get(key)
        if cfg is None:
            cfg = self.best[key] = self._tune(grid, args, kwargs)
        return self.fn[grid](*args, num_warps=cfg[0], num_stages=cfg[1], **kwargs)

    def _tune(self, grid, args, kwargs):
        from triton.testing import do_bench

        timings = {}
        for warps, stages in self.configs:
            try:
                timings[(warps, stages)] = do_bench(
                    lambda: self.fn[grid](*args, num_warps=warps, num_stages=stages, **kwargs))
            except Exception as err:  # a config that does not fit (shared memory, registers): skipped, as triton does
                if type(err).__name__ not in _UNFIT:
                    raise
        if not timings:
            raise RuntimeError(f"no launch configuration of {getattr(self.fn, '__name__', self.fn)} fits this GPU")
        return min(timings, key=timings.get)
