"""Small helpers shared by the Triton kernel modules. Imports nothing of triton (it stays lazy)."""
from __future__ import annotations

import importlib.util
import os

__all__ = ["triton_installed", "next_pow2", "HAVE_TRITON", "available", "lazy_jit", "bind_triton", "FastLaunch",
           "jit_kernel"]


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



def _jit_accepts(triton_module, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(triton_module.runtime.jit.JITFunction.__init__).parameters
    except (AttributeError, TypeError, ValueError):  # pragma: no cover - an unusual triton build
        return False


class FastLaunch:
    """Launch a ``triton.jit`` kernel without Triton's per-call argument binding and specialisation.

    ``JITFunction.run`` binds and specialises every argument in Python on every launch (~100 us of host time per
    launch measured on the H200 host for the ~30-argument gate and DAG kernels, against ~5-10 us of GPU work on
    a molecule batch; the training step is host-bound). The first launch for a key goes through
    ``JITFunction.run``, which compiles and returns the compiled kernel; later launches with the same key call
    that kernel's launcher directly. The key holds the constexprs and launch options, the device, and per
    argument what Triton specialises on: a tensor's dtype and (unless named in ``no_align``) whether it is
    16-byte aligned, an integer's ``== 1`` and divisibility by 16 (unless named in ``free``), any other value
    itself. ``free`` / ``no_align`` must match the kernel's ``do_not_specialize`` /
    ``do_not_specialize_on_alignment`` (:func:`jit_kernel` passes both). Launch hooks
    (``knobs.runtime.launch_enter_hook``, e.g. proton) are not called on the fast path. Under
    ``TRITON_INTERPRET=1`` every launch takes the plain path.

    Launch as ``FastLaunch(jit_fn, free=("N",))[grid](*args, **constexprs_and_options)``.
    """

    def __init__(self, fn, free=(), no_align=()):
        import torch

        self.fn, self.cache, self.tensor = fn, {}, torch.Tensor
        self.names = list(fn.arg_names)
        self.free = frozenset(self.names.index(f) for f in free if f in self.names)
        self.no_align = frozenset(self.names.index(f) for f in no_align if f in self.names)
        try:
            self.stream = torch._C._cuda_getCurrentRawStream  # what Triton's own driver uses
        except AttributeError:  # pragma: no cover - older torch
            self.stream = lambda idx: torch.cuda.current_stream(idx).cuda_stream

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def _key(self, args, kwargs):
        spec = [tuple(kwargs.items())]
        tensor, free, no_align = self.tensor, self.free, self.no_align
        for i, a in enumerate(args):
            if isinstance(a, tensor):
                spec.append(a.dtype)
                if i not in no_align:
                    spec.append(a.data_ptr() & 15 == 0)
            elif type(a) is int:  # (Triton's argument type also depends on the range: i32 / i64)
                spec.append(-0x80000000 <= a < 0x80000000 if i in free else (a == 1, a % 16 == 0, a < 0x80000000))
            elif type(a) is not float:
                spec.append(a)
        return tuple(spec)

    def run(self, grid, args, kwargs):
        if os.environ.get("TRITON_INTERPRET") == "1":
            return self.fn[grid](*args, **kwargs)
        device = args[0].device.index
        key = (device, self._key(args, kwargs))
        kern = self.cache.get(key)
        if kern is None:
            kern = self.fn[grid](*args, **kwargs)
            if hasattr(kern, "result"):  # asynchronous compilation
                kern = kern.result()
            self.cache[key] = kern
            return kern
        full = list(args)
        full += [kwargs[n] for n in self.names[len(args):]]
        g0, g1, g2 = (tuple(grid) + (1, 1))[:3]
        kern.run(g0, g1, g2, self.stream(device), kern.function, kern.packed_metadata, None, None, None, *full)
        return kern


_FAST = {}


def jit_kernel(fn, bind, free=(), no_align=()):
    """``fn`` jitted on first use behind a cached :class:`FastLaunch`, one per function and interpreter mode.

    ``bind()`` imports triton, binds whatever the kernel body needs as module globals (``tl``, jitted device
    helpers) and returns the triton module; it runs only when the kernel is built, not on every launch.
    ``do_not_specialize=free`` (integer arguments that change with every batch: no recompiles) and
    ``do_not_specialize_on_alignment=no_align`` (index arrays that are views into packed batch buffers, whose
    16-byte alignment changes with every batch: without this a batch could compile a new variant; dropped on a
    triton too old to know the option)."""
    key = (fn.__module__, fn.__qualname__, os.environ.get("TRITON_INTERPRET") == "1")
    fl = _FAST.get(key)
    if fl is None:
        triton_module = bind()
        free, no_align = list(free), list(no_align)
        kw = {"do_not_specialize": free} if free else {}
        if no_align and _jit_accepts(triton_module, "do_not_specialize_on_alignment"):
            kw["do_not_specialize_on_alignment"] = no_align
        else:
            no_align = []
        fl = _FAST[key] = FastLaunch(lazy_jit(fn, triton_module, **kw), free, no_align)
    return fl
