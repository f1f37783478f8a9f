import math

import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck

from plstm_graph import compile_dag
from plstm_graph.nn import PLSTMGraphLayer, p_normalize

from .graph_factories import chain_dag, grid_dag, random_dag


def _diamondish():
    ei = torch.tensor([[0, 0, 1, 2, 1, 3, 2], [1, 2, 3, 3, 4, 4, 4]])
    return ei, 5


@pytest.mark.parametrize("mode", ["P", "D"])
@pytest.mark.parametrize("edge_dim", [None, 3])
def test_shapes_and_modes(mode, edge_dim):
    ei, n = _diamondish()
    s = compile_dag(ei, n, mode=mode)
    layer = PLSTMGraphLayer(16, 4, mode=mode, edge_dim=edge_dim)
    ea = torch.randn(ei.size(1), 3) if edge_dim else None
    y = layer(torch.randn(n, 16), s, edge_attr=ea)
    assert y.shape == (n, 16) and torch.isfinite(y).all()
    g = layer.gates(torch.randn(n, 16), s, ea)
    assert g.source.shape == (s.num_edges, 4) and g.transition.shape == (s.num_line_edges, 4)
    assert g.mark.shape == (s.num_edges, 4) and g.direct.shape == (n, 4)


def test_user_errors():
    ei, n = _diamondish()
    s_p = compile_dag(ei, n, mode="P")
    with pytest.raises(ValueError, match="D-mode layer got a P-mode schedule"):
        PLSTMGraphLayer(8, 2, mode="D")(torch.randn(n, 8), s_p)
    with pytest.raises(ValueError, match="edge_dim=3"):
        PLSTMGraphLayer(8, 2, edge_dim=3)(torch.randn(n, 8), s_p)
    with pytest.raises(ValueError, match="edge_attr has shape"):
        PLSTMGraphLayer(8, 2, edge_dim=3)(torch.randn(n, 8), s_p, torch.randn(2, 3))
    with pytest.raises(ValueError, match="rows"):
        PLSTMGraphLayer(8, 2)(torch.randn(n + 1, 8), s_p)
    with pytest.raises(TypeError, match="DAGSchedule"):
        PLSTMGraphLayer(8, 2)(torch.randn(n, 8), ei)
    with pytest.raises(ValueError, match="divisible"):
        PLSTMGraphLayer(10, 3)


def test_gates_match_hand_computation():
    """Gate pre-activations are the documented local sums (checked by hand on one line edge)."""
    torch.manual_seed(0)
    ei = torch.tensor([[0, 1, 1], [1, 2, 3]])  # 0 -> 1 -> {2, 3}
    s = compile_dag(ei, 4, mode="P")
    layer = PLSTMGraphLayer(8, 2, mode="P", edge_dim=2, gate_init_std=0.5)
    x, ea = torch.randn(4, 8), torch.randn(3, 2)
    g = layer.gates(x, s, ea)
    wn = layer.gate_node.weight.view(2, 8, 8)  # [H, slot, dim]
    we = layer.gate_edge.weight.view(2, 4, 2)
    # source of edge 1 (1 -> 2), head 0, before normalisation
    pre = wn[0, 0] @ x[1] + wn[0, 1] @ x[2] + we[0, 0] @ ea[1] + layer.source_bias[0]
    src = [torch.sigmoid(wn[0, 0] @ x[1] + wn[0, 1] @ x[hh] + we[0, 0] @ ea[e] + layer.source_bias[0])
           for e, hh in ((1, 2), (2, 3))]
    expect = torch.sigmoid(pre) / max(1.0, float((src[0] + src[1]).detach()))
    assert torch.allclose(g.source[1, 0], expect, atol=1e-6)
    # transitions of line edges (0 -> 1) and (0 -> 2) through node 1, head 1
    ts = []
    for b, w in ((1, 2), (2, 3)):
        t = wn[1, 4] @ x[0] + wn[1, 5] @ x[1] + wn[1, 6] @ x[w] + we[1, 2] @ ea[0] + we[1, 3] @ ea[b]
        ts.append(torch.tanh(5 * (t + layer.transition_bias[1])))
    denom = max(1.0, float((ts[0].abs() + ts[1].abs()).detach()))
    li = s.line_index.t().tolist()
    for (a, b), t in zip([(0, 1), (0, 2)], ts):
        assert torch.allclose(g.transition[li.index([a, b]), 1], t / denom, atol=1e-6)
    # mark of edge 0 (0 -> 1): head node 1, tail node 0
    m = torch.sigmoid(wn[0, 2] @ x[1] + wn[0, 3] @ x[0] + we[0, 1] @ ea[0] + layer.mark_bias[0])
    assert torch.allclose(g.mark[0, 0], m, atol=1e-6)
    assert torch.allclose(g.direct[2, 1], torch.sigmoid(wn[1, 7] @ x[2] + layer.direct_bias[1]), atol=1e-6)


def _check_p_bound(g, s, tol=1e-5):
    n, e = s.num_nodes, s.num_edges
    h = g.source.size(1)
    src_sum = torch.zeros(n, h, dtype=torch.float64).index_add_(0, s.edge_index[0], g.source.double().abs())
    tr_sum = torch.zeros(e, h, dtype=torch.float64).index_add_(0, s.line_index[0], g.transition.double().abs())
    assert torch.isfinite(g.source).all() and torch.isfinite(g.transition).all()
    if src_sum.numel():
        assert float(src_sum.max()) <= 1 + tol
    if tr_sum.numel():
        assert float(tr_sum.max()) <= 1 + tol


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_nodes=st.integers(1, 14),
    p=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
    x_scale=st.sampled_from([0.0, 1e-30, 1.0, 1e3, 1e15, 1e30]),
    w_scale=st.sampled_from([0.0, 1.0, 8.0, 1e4]),
    bias=st.sampled_from([-50.0, 0.0, 4.0, 50.0]),
    with_edges=st.booleans(),
)
def test_p_mode_bound_property(num_nodes, p, seed, x_scale, w_scale, bias, with_edges):
    """SPEC section 3, for any input: per node sum |source| <= 1; per incoming edge sum |transition| <= 1."""
    gen = torch.Generator().manual_seed(seed)
    s = compile_dag(random_dag(num_nodes, p, gen), num_nodes, mode="P")
    layer = PLSTMGraphLayer(8, 2, mode="P", edge_dim=3 if with_edges else None)
    with torch.no_grad():
        for prm in layer.parameters():
            prm.mul_(w_scale)
        for b in (layer.source_bias, layer.transition_bias):
            b.fill_(bias)
    x = torch.randn(num_nodes, 8, generator=gen) * x_scale
    ea = torch.randn(s.num_edges, 3, generator=gen) * x_scale if with_edges else None
    _check_p_bound(layer.gates(x, s, ea), s)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    values=st.lists(st.floats(-1.0, 1.0), min_size=30, max_size=30),
)
def test_p_normalize_property(sizes, values):
    group = torch.cat([torch.full((k,), i) for i, k in enumerate(sizes)])
    vals = torch.tensor(values[: group.numel()], dtype=torch.float32)[:, None]
    out = p_normalize(vals, group, len(sizes))
    sums = torch.zeros(len(sizes), 1, dtype=torch.float64).index_add_(0, group, out.double().abs())
    assert float(sums.max()) <= 1 + 1e-6
    raw = torch.zeros(len(sizes), 1).index_add_(0, group, vals.abs())
    inside = (raw <= 1)[group]  # groups already inside the bound are untouched
    assert torch.equal(out[inside], vals[inside])
    # signs are kept and ratios inside a group are kept
    assert torch.all(out * vals >= 0)


def test_d_mode_gates_bounded_and_multitree_schedule():
    gen = torch.Generator().manual_seed(1)
    ei = random_dag(12, 0.4, gen)
    s = compile_dag(ei, 12, mode="D")
    layer = PLSTMGraphLayer(8, 2, mode="D")
    with torch.no_grad():
        for prm in layer.parameters():
            prm.mul_(100.0)
    g = layer.gates(torch.randn(12, 8, generator=gen) * 100, s)
    assert g.transition.abs().max() <= 1 and g.source.abs().max() <= 1
    assert s.num_line_edges <= compile_dag(ei, 12, mode="P").num_line_edges


@pytest.mark.parametrize("mode", ["P", "D"])
def test_gradcheck_float64(mode):
    torch.manual_seed(0)
    ei, n = _diamondish()
    s = compile_dag(ei, n, mode=mode)
    layer = PLSTMGraphLayer(4, 2, mode=mode, edge_dim=2, gate_init_std=0.3, transition_bias=0.1,
                            transition_scale=1.0).double()
    x = torch.randn(n, 4, dtype=torch.float64, requires_grad=True)
    ea = torch.randn(ei.size(1), 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, ea: layer(x, s, ea), (x, ea), fast_mode=True)


@pytest.mark.parametrize("mode", ["P", "D"])
def test_backends_agree_outputs_and_grads(mode):
    gen = torch.Generator().manual_seed(3)
    ei = random_dag(9, 0.35, gen)
    s = compile_dag(ei, 9, mode=mode)
    x = torch.randn(9, 8, generator=gen, dtype=torch.float64)
    ea = torch.randn(s.num_edges, 2, generator=gen, dtype=torch.float64)
    torch.manual_seed(0)
    ref = PLSTMGraphLayer(8, 2, mode=mode, edge_dim=2, backend="reference", gate_init_std=0.3).double()
    outs = {}
    for backend in ("reference", "levels", "parallel"):
        layer = PLSTMGraphLayer(8, 2, mode=mode, edge_dim=2, backend=backend).double()
        layer.load_state_dict(ref.state_dict())
        xx, ee = x.clone().requires_grad_(), ea.clone().requires_grad_()
        y = layer(xx, s, ee)
        y.pow(2).sum().backward()
        outs[backend] = (y, xx.grad, ee.grad, [p.grad for p in layer.parameters()])
    for backend in ("levels", "parallel"):
        a, b = outs[backend], outs["reference"]
        torch.testing.assert_close(a[0], b[0])
        torch.testing.assert_close(a[1], b[1])
        torch.testing.assert_close(a[2], b[2])
        for ga, gb in zip(a[3], b[3]):
            torch.testing.assert_close(ga, gb)


def test_no_edges_single_node_and_empty():
    layer = PLSTMGraphLayer(8, 2, mode="P")
    s1 = compile_dag(torch.zeros(2, 0, dtype=torch.long), 1)
    y = layer(torch.randn(1, 8), s1)
    assert y.shape == (1, 8) and torch.isfinite(y).all()
    s3 = compile_dag(torch.zeros(2, 0, dtype=torch.long), 3)
    assert torch.isfinite(layer(torch.randn(3, 8), s3)).all()


@pytest.mark.parametrize("mode", ["P", "D"])
def test_autocast_bf16_cpu(mode):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    ei = random_dag(20, 0.2, gen)
    s = compile_dag(ei, 20, mode=mode)
    layer = PLSTMGraphLayer(16, 2, mode=mode, edge_dim=4)
    x = torch.randn(20, 16, requires_grad=True)
    ea = torch.randn(s.num_edges, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x, s, ea)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    y32 = layer(x, s, ea)
    assert (y.float() - y32).abs().max() < 0.1 * y32.abs().max() + 0.05


def test_autocast_false_computes_in_float32_under_autocast():
    """``autocast=False``: under bf16 autocast the layer gives exactly its float32 result (output float32, the
    same gradients), from a bf16 input too; the default layer computes in bf16 there (the test above)."""
    torch.manual_seed(0)
    s = compile_dag(random_dag(20, 0.25, torch.Generator().manual_seed(3)), 20, mode="P")
    layer = PLSTMGraphLayer(16, 2, mode="P", edge_dim=4, autocast=False)
    x = torch.randn(20, 16, requires_grad=True)
    ea = torch.randn(s.num_edges, 4)
    ref = layer(x, s, ea)
    (gref,) = torch.autograd.grad(ref.square().sum(), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x, s, ea)
        yb = layer(x.bfloat16(), s, ea.bfloat16())
    assert y.dtype == torch.float32 and torch.equal(y, ref)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    assert torch.equal(gx, gref)
    torch.testing.assert_close(yb, layer(x.bfloat16().float(), s, ea.bfloat16().float()))


def test_reset_parameters_restores_init():
    layer = PLSTMGraphLayer(8, 2, mode="P", edge_dim=2)
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(3.0)
    layer.reset_parameters()
    assert torch.all(layer.source_bias == -4) and torch.all(layer.direct_bias == -6)
    assert torch.all(layer.norm.weight == 1)
    assert layer.gate_node.weight.std() < 0.1


def test_per_head_gate_biases():
    layer = PLSTMGraphLayer(8, 4, mode="D", source_bias=[-4.0, -2.0, 0.0, 1.0], direct_bias=0.5)
    assert layer.source_bias.tolist() == [-4.0, -2.0, 0.0, 1.0] and layer.direct_bias.tolist() == [0.5] * 4
    with torch.no_grad():
        layer.source_bias.zero_()
    layer.reset_parameters()
    assert layer.source_bias.tolist() == [-4.0, -2.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="mark_bias needs one value or num_heads=4"):
        PLSTMGraphLayer(8, 4, mark_bias=[-1.0, 0.0])


def test_torch_compile_tiny_graph():
    """torch.compile must not crash (the level loop and the autograd.Function break the graph)."""
    torch._dynamo.reset()
    ei, n = _diamondish()
    s = compile_dag(ei, n, mode="P")
    layer = PLSTMGraphLayer(8, 2, mode="P")
    compiled = torch.compile(layer, backend="aot_eager")  # inductor codegen takes minutes on 2 cores
    x = torch.randn(n, 8, requires_grad=True)
    y = compiled(x, s)
    torch.testing.assert_close(y, layer(x, s))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_gradcheck_p_normalize_and_gates():
    torch.manual_seed(1)
    vals = (torch.rand(7, 2, dtype=torch.float64) * 1.6 - 0.8).requires_grad_()
    group = torch.tensor([0, 0, 0, 1, 2, 2, 3])  # groups with sums above and below 1
    assert torch.autograd.gradcheck(lambda v: p_normalize(v, group, 4), (vals,))
    ei, n = _diamondish()
    s = compile_dag(ei, n, mode="P")
    layer = PLSTMGraphLayer(4, 2, mode="P", edge_dim=2, gate_init_std=0.5, transition_scale=1.0).double()
    x = torch.randn(n, 4, dtype=torch.float64, requires_grad=True)
    ea = torch.randn(ei.size(1), 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, ea: tuple(layer.gates(x, s, ea)), (x, ea))
