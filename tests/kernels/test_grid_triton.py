"""Fused Triton contractions of the tiled grid operator (``kernels/grid.py``) against their einsum references
(outputs and the gradients of every input, strided inputs, ragged node blocks, split head dims), and the whole
``plstm_grid(..., use_triton=True)`` against the node-by-node reference on square, wide, tall, one-wide and
odd grids. Triton interpreter on CPU in float64 (float32 on CUDA when present)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed (pip install 'plstm-graph[triton]')")

from plstm_graph.kernels import grid as kgrid  # noqa: E402
from plstm_graph.ops.grid import plstm_grid  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32 if DEVICE == "cuda" else torch.float64  # the interpreter runs float64 dots exactly
TOL = 2e-4 if DTYPE == torch.float32 else 1e-10


def _close(name, a, b):
    scale = b.abs().max().item() + 1e-6
    err = (a.detach().double() - b.detach().double()).abs().max().item()
    assert err <= TOL * scale, f"{name}: max error {err:.3g} vs scale {scale:.3g}"


def _check(fn, ref, inputs, names, seed=0):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out, out_ref = fn(*leaves), ref(*ref_leaves)
    _close("out", out, out_ref)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype).to(out.device)
    grads = torch.autograd.grad((out * w).sum(), leaves, allow_unused=True)
    grads_ref = torch.autograd.grad((out_ref * w).sum(), ref_leaves, allow_unused=True)
    zero = lambda g, t: torch.zeros_like(t) if g is None else g  # noqa: E731  (gates outside a one-wide grid)
    grads = [zero(g, t) for g, t in zip(grads, leaves)]
    grads_ref = [zero(g, t) for g, t in zip(grads_ref, ref_leaves)]
    for name, a, b in zip(names, grads, grads_ref):
        _close(f"grad {name}", a, b)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE).to(DEVICE)


# (W, A, N, K, V): tile-like shapes, ragged node blocks (N = 5, 70), split head dims (K = 80 > 64), A = 1
SHAPES = [(2, 5, 6, 4, 3), (1, 3, 70, 16, 8), (1, 2, 9, 80, 20), (1, 1, 17, 8, 8)]


@pytest.mark.parametrize("W,A,N,K,V", SHAPES)
def test_scatter_boundary_matches_einsum(W, A, N, K, V):
    S = _randn(W, N, A, seed=1).transpose(1, 2)  # a strided [W, A, N] view, as Sout is in the operator
    x, z = _randn(W, N, K, seed=2), _randn(W, N, V, seed=3)
    _check(kgrid.scatter_boundary, kgrid.scatter_boundary_reference, [S, x, z], ["S", "x", "z"])


@pytest.mark.parametrize("W,A,N,K,V", SHAPES)
def test_read_boundary_matches_einsum(W, A, N, K, V):
    M = _randn(W, N, A + 2, seed=4)[..., 1:-1]  # strided, as Min is a column slice in the operator
    x, C = _randn(W, N, K, seed=5), _randn(W, A, K, V, seed=6)
    _check(kgrid.read_boundary, kgrid.read_boundary_reference, [M, x, C], ["M", "x", "C"])


GATES = 9


def _grid_inputs(B, Y, X, H, K, V, seed):
    q, k = _randn(B, Y, X, H, K, seed=seed), _randn(B, Y, X, H, K, seed=seed + 1)
    v = _randn(B, Y, X, H, V, seed=seed + 2)
    gates = [_randn(B, Y, X, H, seed=seed + 3 + i).tanh() for i in range(GATES)]  # both signs, |g| < 1
    return [q, k, v] + gates


@pytest.mark.parametrize("Y,X,tile", [(3, 7, 2), (7, 3, (2, 3)), (1, 6, 2), (6, 1, 3), (5, 5, 3)])
def test_operator_triton_matches_reference(Y, X, tile):
    inputs = _grid_inputs(1, Y, X, 1, 3, 2, seed=Y * 10 + X)
    names = ["q", "k", "v"] + [f"gate{i}" for i in range(GATES)]
    _check(lambda *t: plstm_grid(*t, backend="tiled", tile=tile, use_triton=True),
           lambda *t: plstm_grid(*t, backend="reference"), inputs, names)


def test_operator_triton_equals_torch_path():
    # tile 4 x 3 (doubling tile matrices), ragged tiles both ways, K != V
    inputs = _grid_inputs(1, 9, 7, 1, 5, 3, seed=11)
    names = ["q", "k", "v"] + [f"gate{i}" for i in range(GATES)]
    _check(lambda *t: plstm_grid(*t, tile=(4, 3), use_triton=True),
           lambda *t: plstm_grid(*t, tile=(4, 3), use_triton=False), inputs, names)


def test_use_triton_rejects_unsupported():
    inputs = _grid_inputs(1, 4, 4, 1, kgrid.MAX_HEAD_DIM + 1, 2, seed=0)
    with pytest.raises(ValueError, match="use_triton"):
        plstm_grid(*inputs, tile=2, use_triton=True)
    y = plstm_grid(*inputs, tile=2)  # the default falls back to torch
    assert y.shape == (1, 4, 4, 1, 2)


# (nyt, nxt, Py, A, BH, KV): one row / one column of tiles, A < 16 and A = 16 (dot padding), a KV that is not a
# multiple of the KV block, several (bh, kv-block) programs
WAVE_SHAPES = [(3, 4, 2, 5, 2, 6), (1, 5, 1, 3, 1, 4), (4, 1, 3, 4, 3, 20), (2, 3, 8, 16, 2, 70)]


@pytest.mark.parametrize("nyt,nxt,Py,A,BH,KV", WAVE_SHAPES)
def test_wavefront_kernel_matches_reference(nyt, nxt, Py, A, BH, KV):
    from plstm_graph.ops.grid.tiled import _diagonal_plan, _tile_positions, wavefront_reference

    T = nyt * nxt
    tys, txs, _ = _diagonal_plan(nyt, nxt)
    pos = _tile_positions(tys, txs, nxt, DEVICE)
    Tb = _randn(T, BH, A, A, seed=7) * 0.4  # a product of many Tb would blow up at scale 1
    cloc = _randn(T, BH, A, KV, seed=8)
    _check(lambda a, b: kgrid.wavefront_triton(a, b, Py, nyt, nxt, pos),
           lambda a, b: wavefront_reference(a, b, Py, nyt, nxt), [Tb, cloc], ["Tb", "cloc"])
