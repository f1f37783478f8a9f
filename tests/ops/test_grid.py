"""Grid pLSTM operator: tiled fast path == readable reference == plstm_dag on the grid DAG (SPEC section 5)."""
import pytest
import torch

from plstm_graph import plstm_dag
from plstm_graph.ops.grid import grid_dag, plstm_grid

GATES = ("source_r", "source_d", "trans_rr", "trans_rd", "trans_dd", "trans_dr", "mark_r", "mark_d", "direct")


def make_inputs(B, Y, X, H, K, V, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Y, X, H, K, generator=gen, dtype=dtype)
    k = torch.randn(B, Y, X, H, K, generator=gen, dtype=dtype)
    v = torch.randn(B, Y, X, H, V, generator=gen, dtype=dtype)
    # gates of both signs and magnitudes up to ~1, as a P/D layer may produce
    gates = [(torch.rand(B, Y, X, H, generator=gen, dtype=dtype) * 2 - 1) for _ in GATES]
    return [q, k, v] + gates


def dag_forward(inputs):
    q, k, v, *gates = inputs
    B, Y, X = q.shape[:3]
    g = grid_dag(Y, X, batch=B)
    src, trans, mark, direct = g.to_dag_gates(*gates)
    y = plstm_dag(g.to_dag_nodes(q), g.to_dag_nodes(k), g.to_dag_nodes(v), src, trans, mark, direct, g.schedule,
                  backend="levels")
    return g.from_dag_nodes(y)


def grads(fn, inputs, seed=1):
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    y = fn(leaves)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    gs = torch.autograd.grad((y * w).sum(), leaves, allow_unused=True)
    return y.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, gs)]


def assert_same(fa, fb, inputs, atol=1e-9):
    ya, ga = grads(fa, inputs)
    yb, gb = grads(fb, inputs)
    torch.testing.assert_close(ya, yb, atol=atol, rtol=1e-7)
    for name, a, b in zip(("q", "k", "v") + GATES, ga, gb):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-7, msg=lambda m: f"grad of {name}: {m}")


SIZES = [(4, 4), (3, 7), (7, 3), (1, 6), (6, 1), (5, 5), (1, 1), (2, 9)]


@pytest.mark.parametrize("Y,X", SIZES)
def test_reference_equals_dag(Y, X):
    inputs = make_inputs(2, Y, X, 2, 3, 2)
    assert_same(lambda t: plstm_grid(*t, backend="reference"), dag_forward, inputs)


@pytest.mark.parametrize("Y,X", SIZES)
@pytest.mark.parametrize("tile", [None, 1, 2, 3, (4, 3)])
def test_tiled_equals_dag(Y, X, tile):
    inputs = make_inputs(2, Y, X, 2, 3, 2, seed=Y * 10 + X)
    assert_same(lambda t: plstm_grid(*t, backend="tiled", tile=tile), dag_forward, inputs)


@pytest.mark.parametrize("Y,X,tile", [(9, 11, 4), (13, 6, 5), (3, 18, None), (18, 2, 16), (6, 10, 3)])
def test_tiled_equals_reference_not_multiple_of_tile(Y, X, tile):
    # larger grids than the DAG comparison; includes the default 16-tile with a ragged last tile
    inputs = make_inputs(1, Y, X, 2, 4, 3, seed=3)
    assert_same(lambda t: plstm_grid(*t, backend="tiled", tile=tile),
                lambda t: plstm_grid(*t, backend="reference"), inputs)


@pytest.mark.parametrize("Py,Px", [(1, 5), (2, 3), (4, 1), (8, 5), (16, 7)])
def test_tile_matrices_doubling_equals_row_dp(Py, Px):
    from plstm_graph.ops.grid.tiled import tile_matrices, tile_matrices_doubling

    gen = torch.Generator().manual_seed(Py * Px)
    gates = [torch.randn(3, Py, Px, generator=gen, dtype=torch.float64) for _ in range(8)]
    for a, b in zip(tile_matrices(*gates), tile_matrices_doubling(*gates)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("tile", [2, (3, 2)])  # doubling / row-DP tile matrices
def test_gradcheck_tiled_float64(tile):
    inputs = make_inputs(1, 3, 4, 1, 2, 2, seed=5)
    inputs[5] = inputs[5].clone()
    inputs[5][0, 1, 2, 0] = 0.0  # an exact zero transition inside a row product
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    assert torch.autograd.gradcheck(lambda *t: plstm_grid(*t, backend="tiled", tile=tile), leaves)


def test_gradcheck_tiled_single_tile_float64():
    leaves = [t.clone().requires_grad_(True) for t in make_inputs(1, 3, 3, 1, 2, 1, seed=6)]
    assert torch.autograd.gradcheck(lambda *t: plstm_grid(*t, backend="tiled"), leaves)


def test_gates_outside_grid_are_ignored():
    B, Y, X = 1, 4, 5
    inputs = make_inputs(B, Y, X, 2, 3, 3, seed=7)
    _, g = grads(lambda t: plstm_grid(*t, tile=2), inputs)
    named = dict(zip(GATES, g[3:]))
    for name in ("trans_rr", "trans_rd", "mark_r"):  # read r(-1, y)
        assert named[name][:, :, 0].abs().max() == 0, name
    for name in ("trans_dd", "trans_dr", "mark_d"):  # read d(x, -1)
        assert named[name][:, 0].abs().max() == 0, name
    for name in ("source_r", "trans_rr", "trans_dr"):  # write r(X-1, y), which leaves the grid
        assert named[name][:, :, -1].abs().max() == 0, name
    for name in ("source_d", "trans_dd", "trans_rd"):  # write d(x, Y-1)
        assert named[name][:, -1].abs().max() == 0, name
    # and the rest is live (the checks above are not vacuous)
    for name in GATES:
        assert named[name][:, 1:-1, 1:-1].abs().min() > 0, name


def test_half_precision_matches_float32():
    inputs = make_inputs(2, 6, 5, 2, 8, 8, dtype=torch.float32, seed=8)
    y32 = plstm_grid(*inputs, tile=4)
    y16 = plstm_grid(*[t.to(torch.bfloat16) for t in inputs], tile=4)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=0.05 * y32.abs().max().item(), rtol=0.05)


def test_bad_inputs():
    q, k, v, *g = make_inputs(1, 3, 3, 2, 2, 2)
    with pytest.raises(ValueError, match="trans_rd"):
        bad = list(g)
        bad[3] = bad[3][..., :1]
        plstm_grid(q, k, v, *bad)
    with pytest.raises(ValueError, match=r"\[B, Y, X, H, K\]"):
        plstm_grid(q[0], k, v, *g)
    with pytest.raises(ValueError, match="backend"):
        plstm_grid(q, k, v, *g, backend="nope")
    with pytest.raises(ValueError, match="tile"):
        plstm_grid(q, k, v, *g, tile=0)


def test_grid_dag_structure():
    g = grid_dag(3, 4)
    s = g.schedule
    assert s.num_nodes == 12 and s.num_edges == 3 * 3 + 2 * 4
    # interior node (1, 1): 2 in-edges x 2 out-edges; every line kind appears
    assert set(g.line_kind.tolist()) == {0, 1, 2, 3}
    assert s.num_levels == 3 + 4 - 1


@pytest.mark.parametrize("nyt,nxt,Py", [(1, 4, 2), (4, 1, 3), (2, 3, 2), (3, 2, 1), (3, 4, 3)])
def test_wavefront_equals_reference(nyt, nxt, Py):
    # the one-autograd-node wavefront over tiles (anti-diagonal slices) == tile-by-tile autograd, with gradients
    from plstm_graph.ops.grid.tiled import wavefront, wavefront_reference

    A, BH, KV = Py + 2, 2, 3
    gen = torch.Generator().manual_seed(nyt * 10 + nxt)
    Tb = torch.randn(nyt * nxt, BH, A, A, generator=gen, dtype=torch.float64) * 0.5
    cloc = torch.randn(nyt * nxt, BH, A, KV, generator=gen, dtype=torch.float64)
    assert_same(lambda t: wavefront(t[0], t[1], Py, nyt, nxt), lambda t: wavefront_reference(t[0], t[1], Py, nyt, nxt),
                [Tb, cloc], atol=1e-12)
    leaves = [t.clone().requires_grad_(True) for t in (Tb, cloc)]
    assert torch.autograd.gradcheck(lambda a, b: wavefront(a, b, Py, nyt, nxt), leaves)


def test_default_tile_rule():
    from plstm_graph.ops.grid import default_tile

    # up to 16: one tile (power-of-two height for the doubling build); beyond: tiles of 8
    assert default_tile(16, 16) == (16, 16)
    assert default_tile(5, 7) == (8, 7)
    assert default_tile(1, 40) == (1, 8)
    assert default_tile(64, 64) == (8, 8)
    assert default_tile(17, 12) == (8, 12)


def _tile_gates(W, Py, Px, seed, zero_at=None):
    gen = torch.Generator().manual_seed(seed)
    gates = torch.rand(W, Py, Px, 9, generator=gen, dtype=torch.float64) * 2 - 1
    if zero_at is not None:
        gates[zero_at] = 0.0  # an exact zero transition inside a row product
    return gates


# one row (no merge), one column, odd widths, the default 16 x 16, a zero trans_rr
TILE_SHAPES = [(1, 1), (1, 5), (2, 1), (2, 3), (4, 7), (8, 2), (16, 16)]


@pytest.mark.parametrize("Py,Px", TILE_SHAPES)
def test_tile_blocks_node_equals_row_dp(Py, Px):
    # _TileBlocks (closed-form rows, gather merges, direct on the diagonal of G) == the row DP, forward and
    # gradients of all nine gates (plain autograd through the DP)
    from plstm_graph.ops.grid.tiled import _TileBlocks, tile_matrices

    N = Py * Px
    gates = _tile_gates(3, Py, Px, seed=Py * 31 + Px, zero_at=(1, Py - 1, Px // 2, 2))

    def dp(g):
        g_full, t_out = tile_matrices(*g.unbind(-1)[:8])
        G = g_full[..., :N] + torch.diag_embed(g[..., 8].reshape(-1, N))
        return G, g_full[..., N:], t_out[..., :N], t_out[..., N:]

    fast = lambda g: torch.cat([b.flatten(1) for b in _TileBlocks.apply(g)], 1)  # noqa: E731
    ref = lambda g: torch.cat([b.flatten(1) for b in dp(g)], 1)  # noqa: E731
    assert_same(lambda t: fast(t[0]), lambda t: ref(t[0]), [gates], atol=1e-12)


@pytest.mark.parametrize("Py,Px", [(1, 3), (2, 2), (4, 1), (2, 3)])
def test_tile_blocks_node_gradcheck(Py, Px):
    from plstm_graph.ops.grid.tiled import _TileBlocks

    gates = _tile_gates(2, Py, Px, seed=Py + 7 * Px, zero_at=(0, 0, Px - 1, 2)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda g: _TileBlocks.apply(g), [gates])
    # a gradient for some blocks only (the others None)
    assert torch.autograd.gradcheck(lambda g: _TileBlocks.apply(g)[1:3], [gates])


@pytest.mark.parametrize("n,h,Px,final", [(3, 1, 3, False), (4, 2, 2, True), (1, 1, 1, True), (10, 2, 5, False)])
def test_merge_maps_equal_strip_merge(n, h, Px, final):
    # the gather form of one strip merge == the readable slices-and-cats _strip_merge (direct = 0)
    from plstm_graph.ops.grid.tiled import _block_order, _merge_maps, _strip_merge

    R = n + h + Px
    o = torch.randn(2, 2, R, R, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    merged = _strip_merge(o, n, h, Px)[:, 0]
    ref = merged.flatten(1)
    x = o[:, 1, :, n + h:] @ o[:, 0, n + h:, :]
    fwd = torch.tensor(_merge_maps(n, h, Px, final)[0])
    # final: the node diagonal is read from the direct slot (random strips are not 0 there; pass it as direct)
    direct = [torch.diagonal(merged, dim1=1, dim2=2)[:, :2 * n]] if final else []
    src = torch.cat([o.flatten(1), x.flatten(1)] + direct + [torch.zeros(2, 1, dtype=o.dtype)], 1)
    got = src[:, fwd]
    if final:
        ref = ref[:, torch.tensor(_block_order(2 * (n + h) + Px, 2 * n))]
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("Y,X,Py,Px", [(5, 7, 2, 3), (4, 4, 2, 2), (1, 6, 1, 4), (6, 1, 4, 1)])
def test_retile_adjoint_and_gradcheck(Y, X, Py, Px):
    # _to_tiles / _from_tiles: each other's backward (a gather, no accumulating scatter); padding included
    from plstm_graph.ops.grid.tiled import _diagonal_plan, _from_tiles, _to_tiles

    B, H, f = 2, 3, 2
    tys, txs, _ = _diagonal_plan(-(-Y // Py), -(-X // Px))
    gen = torch.Generator().manual_seed(Y * X)
    t = torch.randn(B, Y, X, H, f, generator=gen, dtype=torch.float64, requires_grad=True)
    tiled = _to_tiles(t, Py, Px, tys, txs)
    torch.testing.assert_close(_from_tiles(tiled, B, H, Y, X, Py, Px, tys, txs), t, rtol=0, atol=0)
    u = torch.randn(tiled.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    # adjoint: <to(t), u> == <t, from(u)> (from cuts the padding, to pads zeros)
    torch.testing.assert_close((tiled * u).sum(), (t * _from_tiles(u, B, H, Y, X, Py, Px, tys, txs)).sum())
    assert torch.autograd.gradcheck(lambda a: _to_tiles(a, Py, Px, tys, txs), [t])
    assert torch.autograd.gradgradcheck(lambda a: _to_tiles(a, Py, Px, tys, txs), [t])
    assert torch.autograd.gradcheck(lambda a: _from_tiles(a, B, H, Y, X, Py, Px, tys, txs), [u])
