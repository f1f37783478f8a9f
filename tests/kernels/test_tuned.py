"""``kernels._common.Tuned``: the launch-config cache that replaces ``triton.autotune`` on the GPU. Tested with a
fake JIT function and a fake ``do_bench`` (no GPU, no triton compile)."""
import sys
import types

import pytest
import torch

pytest.importorskip("triton", reason="Tuned imports triton.testing")

from plstm_graph.kernels._common import Tuned


class OutOfResources(Exception):  # same class name as triton's
    pass


class FakeKernel:
    """Records launches; config (8, 2) 'runs' fastest; (4, 3) does not fit."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, num_warps, num_stages, **kw):
            if (num_warps, num_stages) == (4, 3):
                raise OutOfResources("shared memory")
            self.launches.append((grid, num_warps, num_stages, kw.get("K")))
        return launch


@pytest.fixture
def fake_bench(monkeypatch):
    calls = []

    # time = what the kernel's last launch recorded: (8, 2) is fastest
    def timed(fn):
        fn()
        grid, w, st, K = kern.launches[-1]
        calls.append((w, st, K))
        return 1.0 if (w, st) != (8, 2) else 0.5

    kern = FakeKernel()
    mod = types.ModuleType("triton.testing")
    mod.do_bench = timed
    monkeypatch.setitem(sys.modules, "triton.testing", mod)
    return kern, calls


def test_tuned_picks_the_fastest_fitting_config_once_per_key(fake_bench):
    kern, calls = fake_bench
    tuned = Tuned(kern, [(4, 1), (8, 2), (4, 3)])
    x = torch.zeros(3)
    tuned[(2, 1)](x, 5, K=16)
    assert sorted(calls) == [(4, 1, 16), (8, 2, 16)]  # (4, 3) skipped: does not fit
    assert kern.launches[-1] == ((2, 1), 8, 2, 16)  # the real launch uses the winner
    n = len(calls)
    tuned[(7, 1)](x, 9, K=16)  # same key (runtime ints and grid do not count): no new timing
    assert len(calls) == n and kern.launches[-1] == ((7, 1), 8, 2, 16)
    tuned[(2, 1)](x.double(), 5, K=16)  # another dtype: tuned again
    tuned[(2, 1)](x, 5, K=32)  # another constexpr value: tuned again
    tuned[(2, 1)](x, 5, K=16, SEG=True)  # another compiled variant (a flag) of the same shape: tuned again
    assert len(calls) == n + 6


class RaisingKernel:
    """Every launch raises ``exc``."""

    def __init__(self, exc):
        self.exc = exc

    def __getitem__(self, grid):
        def launch(*a, **kw):
            raise self.exc
        return launch


def _plain_bench(monkeypatch):
    mod = types.ModuleType("triton.testing")
    mod.do_bench = lambda fn: fn()
    monkeypatch.setitem(sys.modules, "triton.testing", mod)


def test_tuned_reraises_real_errors(monkeypatch):
    _plain_bench(monkeypatch)
    with pytest.raises(TypeError, match="bad argument"):
        Tuned(RaisingKernel(TypeError("bad argument")), [(4, 1)])[(1,)](K=16)


def test_tuned_says_when_nothing_fits(monkeypatch):
    _plain_bench(monkeypatch)
    with pytest.raises(RuntimeError, match="no launch configuration"):
        Tuned(RaisingKernel(OutOfResources("registers")), [(4, 1), (8, 1)])[(1,)](K=16)


class FakeJit:
    """A stand-in for a ``triton.jit`` function: ``fn[grid](*args, **kw)`` 'compiles' (counted) and returns a
    compiled kernel whose ``run`` records the direct launches."""

    arg_names = ["x", "idx", "n", "h", "scale", "K"]

    def __init__(self):
        self.jit_launches = []
        self.kernel = types.SimpleNamespace(function="fn", packed_metadata="meta", direct=[])
        self.kernel.run = lambda *a: self.kernel.direct.append(a)

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.jit_launches.append((grid, args, kw))
            return self.kernel
        return launch


def test_fast_launch_runs_the_compiled_kernel_and_keys_on_specialisation(monkeypatch):
    """FastLaunch: the first launch of a key goes through the JIT function; later ones call the compiled
    kernel's launcher with every argument (constexprs last) and the raw stream. A free count changing keeps
    the key; a specialised integer becoming 1, a dtype change or a misaligned tensor in a position that is
    specialised on alignment make a new key; a misaligned index array (no_align) does not."""
    from plstm_graph.kernels._common import FastLaunch

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fake = FakeJit()
    fl = FastLaunch(fake, free=("n",), no_align=("idx",))
    fl.stream = lambda device: 1234
    x = torch.zeros(8)
    idx = torch.zeros(8, dtype=torch.long)
    fl[(3,)](x, idx, 10, 4, 0.5, K=16)
    assert len(fake.jit_launches) == 1 and not fake.kernel.direct
    fl[(5, 2)](x, idx, 11, 4, 0.25, K=16)  # another count and float: same key, direct launch
    assert len(fake.jit_launches) == 1
    assert fake.kernel.direct[-1] == (5, 2, 1, 1234, "fn", "meta", None, None, None, x, idx, 11, 4, 0.25, 16)
    fl[(5,)](x, idx[1:], 12, 4, 0.5, K=16)  # misaligned index array: not specialised on, same key
    assert len(fake.jit_launches) == 1 and len(fake.kernel.direct) == 2
    fl[(5,)](x[1:], idx, 12, 4, 0.5, K=16)  # misaligned data tensor: a new variant
    fl[(5,)](x, idx, 12, 1, 0.5, K=16)  # h == 1: Triton specialises it
    fl[(5,)](x.double(), idx, 12, 4, 0.5, K=16)  # dtype
    fl[(5,)](x, idx, 12, 4, 0.5, K=32)  # constexpr
    assert len(fake.jit_launches) == 5
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter always takes the plain path
    fl[(5,)](x, idx, 12, 4, 0.5, K=16)
    assert len(fake.jit_launches) == 6
