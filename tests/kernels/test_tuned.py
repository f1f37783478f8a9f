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
