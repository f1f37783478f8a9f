"""Issue item 3: with saturated gates, long chains and big grids stay finite and bounded (both modes);
without the P-mode normalisation the grid explodes."""
import pytest
import torch

from plstm_graph import compile_dag
from plstm_graph.nn import PLSTMGraphLayer

from graph_factories import chain_dag, grid_dag, saturate_


def _provable_bound(layer, x, s):
    """|y_n| <= |q_n| W_n sum_u |k_u||v_u| (path weight) + |d_n||q_n.k_n||v_n| (SPEC section 3 bounds).

    P-mode: the gates are column-substochastic, so the weight that one source spreads over all edges at
    path length p is <= 1 and W_n <= num_levels. D-mode: one path at most between two line nodes and all
    gates <= 1, so W_n <= out-degree(u) * in-degree(n)."""
    n, h, d = x.size(0), layer.num_heads, layer.head_dim
    with torch.no_grad():
        q = layer.q_proj(x).view(n, h, d).double() * d ** -0.5
        k = layer.k_proj(x).view(n, h, d).double()
        v = layer.v_proj(x).view(n, h, d).double()
        kv = k.norm(dim=-1) * v.norm(dim=-1)  # [N, H]
        indeg = torch.bincount(s.edge_index[1], minlength=n).double()
        outdeg = torch.bincount(s.edge_index[0], minlength=n).double()
        if s.mode == "P":
            mass = s.num_levels * kv.sum(0)  # [H]
            far = q.norm(dim=-1) * mass
        else:
            far = q.norm(dim=-1) * indeg[:, None] * (outdeg[:, None] * kv).sum(0)
        near = (q * k).sum(-1).abs() * v.norm(dim=-1)
    return far + near  # [N, H]


CASES = [("chain2000", chain_dag(2000), 2000), ("grid40", grid_dag(40, 40), 1600)]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["P", "D"])
@pytest.mark.parametrize("name,ei,n", CASES, ids=[c[0] for c in CASES])
def test_saturated_gates_finite_and_bounded(mode, name, ei, n):
    torch.manual_seed(0)
    s = compile_dag(ei, n, mode=mode)
    layer = PLSTMGraphLayer(16, 2, mode=mode, edge_dim=2)
    saturate_(layer, 8.0)
    x = torch.randn(n, 16, requires_grad=True)
    ea = torch.randn(s.num_edges, 2, requires_grad=True)
    with torch.no_grad():
        g = layer.gates(x, s, ea)
    if mode == "D":  # the gates really are saturated (in P-mode: before the per-node normalisation)
        assert g.transition.min() > 0.99 and g.source.min() > 0.99
    y_heads = layer.heads(x, s, ea)
    assert torch.isfinite(y_heads).all()
    bound = _provable_bound(layer, x.detach(), s)
    assert torch.all(y_heads.detach().double().norm(dim=-1) <= bound * 1.001 + 1e-4)
    y = layer.out_proj(layer.norm(y_heads).reshape(n, -1))  # = layer(x, s, ea), one operator call less
    assert torch.isfinite(y).all()
    # output after the per-head norm is bounded by construction: |out| <= |W_o| sqrt(H V) max|norm weight|
    assert y.abs().max() <= layer.out_proj.weight.abs().sum(1).max() * layer.norm.weight.abs().max() * 4 + 1e-3
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(ea.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


def test_unnormalised_p_mode_explodes_on_grid():
    torch.manual_seed(0)
    side = 20
    s = compile_dag(grid_dag(side, side), side * side, mode="P")
    x = torch.randn(side * side, 16)
    norms = {}
    for normalize in (True, False):
        torch.manual_seed(1)
        layer = PLSTMGraphLayer(16, 2, mode="P", normalize=normalize)
        saturate_(layer, 8.0)
        with torch.no_grad():
            norms[normalize] = float(layer.heads(x, s).norm())
    assert norms[False] > 1e6 * norms[True]


def test_forward_equals_heads_norm_proj():
    """The stability test rebuilds the output from heads(); check that this is what forward does."""
    s = compile_dag(chain_dag(5), 5, mode="P")
    layer = PLSTMGraphLayer(8, 2, mode="P")
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x, s), layer.out_proj(layer.norm(layer.heads(x, s)).reshape(5, -1)))
