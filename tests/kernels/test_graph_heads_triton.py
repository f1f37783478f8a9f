"""The fused layer middle (``kernels/graph_heads.py``: stacked projection -> gates -> DAG operator in one
Function) against the readable layer (torch gates, reference operator): outputs and every gradient (node input,
edge features, all parameters) on hostile DAGs, both modes, oriented schedules, both kernel strategies, with and
without recomputation, and half-precision projections. Also the DAG kernels reading ``q, k, v`` as column slices
of a wider tensor (row strides) and scaling ``q`` as they load it.

Runs on CPU through the Triton interpreter (``TRITON_INTERPRET=1``), or on CUDA when a GPU is present.
"""
import pytest
import torch

from ._triton_setup import DEVICE  # noqa: E402,I001  (first: sets TRITON_INTERPRET, skips without triton)

from plstm_graph import compile_dag, plstm_dag  # noqa: E402
from plstm_graph.kernels import dag as kd  # noqa: E402
from plstm_graph.kernels import graph_heads as kh  # noqa: E402
from plstm_graph.nn import PLSTMGraphLayer  # noqa: E402

from .test_dag_triton import _hostile_parts  # noqa: E402


def _union_schedule(mode, orientation=None):
    """The small hostile DAGs of the DAG kernel tests in one disjoint union (isolated nodes, chain, fan-in,
    fan-out, diamond with a skip edge, disconnected parts, a random DAG with unordered ids); with
    ``orientation``: every edge in both directions, oriented by ``compile_dag`` (``input_edge_ids``)."""
    rows, off = [], 0
    for edges, n in _hostile_parts():
        rows += [(a + off, b + off) for a, b in edges]
        off += n
    ei = torch.tensor(rows, dtype=torch.long).t().reshape(2, -1)
    if orientation:
        ei = torch.cat([ei, ei.flip(0)], 1)
    return compile_dag(ei, num_nodes=off, mode=mode, orientation=orientation, device=DEVICE), ei.size(1)


def _layers(mode, edge_dim, heads=2, bias=1.0, std=0.5, recompute=False):
    """The fused layer (merged heads) and the readable one (torch gates, reference operator), same weights.
    Biases +1 and wide gate weights: the P rule and tanh transitions of both signs are exercised."""
    torch.manual_seed(0)
    kw = dict(mode=mode, edge_dim=edge_dim, gate_init_std=std, source_bias=bias, mark_bias=bias, direct_bias=bias,
              transition_bias=0.2)
    fused = PLSTMGraphLayer(4 * heads, heads, fused_gates=True, backend="triton", recompute=recompute, **kw)
    plain = PLSTMGraphLayer(4 * heads, heads, fused_gates=False, backend="reference", **kw)
    plain.load_state_dict(fused.state_dict())
    return fused.to(DEVICE), plain.to(DEVICE)


def _run(layer, x, s, e, amp=False):
    x = x.detach().clone().requires_grad_(True)
    e = e.detach().clone().requires_grad_(True) if e is not None else None
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        y = layer(x, s, edge_attr=e)
    torch.manual_seed(1)
    loss = (y * torch.randn_like(y)).sum()
    inputs = [x] + ([e] if e is not None else []) + list(layer.parameters())
    return y, torch.autograd.grad(loss, inputs, allow_unused=True)


def _compare(fused, plain, s, n_in, edge_dim, amp=False, rtol=1e-4, atol=1e-5):
    assert fused._merged_heads(torch.zeros(1, device=DEVICE))
    torch.manual_seed(2)
    x = torch.randn(s.num_nodes, fused.dim, device=DEVICE)
    e = torch.randn(n_in, edge_dim, device=DEVICE) if edge_dim else None
    ya, ga = _run(fused, x, s, e, amp=amp)
    yb, gb = _run(plain, x, s, e, amp=amp)
    assert ya.dtype == (torch.bfloat16 if amp else torch.float32)
    torch.testing.assert_close(ya.float(), yb.float(), rtol=rtol, atol=atol)
    assert len(ga) == len(gb)
    for i, (a, b) in enumerate(zip(ga, gb)):
        if a is None or b is None:  # no gradient path (e.g. no edges): the other one is zero too
            assert (a is None or not a.any()) and (b is None or not b.any()), i
            continue
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol * 10, atol=atol * 10, msg=lambda m: f"grad {i}: {m}")


@pytest.mark.parametrize("mode", ["P", "D"])
@pytest.mark.parametrize("edge_dim", [None, 3])
def test_merged_heads_match_the_readable_layer(mode, edge_dim):
    s, n_in = _union_schedule(mode)
    fused, plain = _layers(mode, edge_dim)
    _compare(fused, plain, s, n_in, edge_dim)


@pytest.mark.parametrize("recompute", [False, True])
def test_merged_heads_oriented_schedule_and_recompute(recompute):
    s, n_in = _union_schedule("P", orientation="index")
    assert s.input_edge_ids is not None and n_in > s.num_edges
    fused, plain = _layers("P", 3, recompute=recompute)
    _compare(fused, plain, s, n_in, 3)


@pytest.mark.parametrize("strategy", ["graph", "levels"])
@pytest.mark.parametrize("recompute", [False, True])
def test_merged_heads_function_equals_the_two_function_path(strategy, recompute):
    """graph_heads_triton directly, each kernel strategy, against gates + operator as two Functions on copies."""
    from plstm_graph.kernels.graph_gates import graph_gates_triton

    s, _ = _union_schedule("P")
    h, k = 2, 5  # K not a power of two
    g = torch.Generator().manual_seed(4)
    p = torch.randn(s.num_nodes, 3 * h * k + 8 * h, generator=g).to(DEVICE).requires_grad_()
    e = torch.randn(s.num_edges, 4 * h, generator=g).to(DEVICE).requires_grad_()
    biases = [torch.randn(h, generator=g).to(DEVICE).requires_grad_() for _ in range(4)]
    y = kh.graph_heads_triton(p, e, biases, s, h, k, k ** -0.5, 3.0, True, recompute=recompute, strategy=strategy)
    w = torch.randn(y.shape, generator=g).to(DEVICE)
    ga = torch.autograd.grad((y * w).sum(), [p, e] + biases)

    n = s.num_nodes
    q, kk, v, gn = p.split([h * k] * 3 + [8 * h], dim=1)
    src, trans, mark, direct = graph_gates_triton(gn.contiguous(), e, *biases, s.edge_index, s.line_index, None, h,
                                                  3.0, True)
    y2 = kd.plstm_dag_triton(q.reshape(n, h, k).contiguous() * k ** -0.5, kk.reshape(n, h, k).contiguous(),
                             v.reshape(n, h, k).contiguous(), src, trans, mark, direct, s, recompute=recompute,
                             strategy=strategy)
    gb = torch.autograd.grad((y2 * w).sum(), [p, e] + biases)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-6)
    for i, (a, b) in enumerate(zip(ga, gb)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {i}: {m}")


def test_merged_heads_half_precision_projection():
    """A bf16 projection (the layer under bf16 autocast, ``autocast=True``): float32 gates and states, the
    output in bf16, against the readable layer under the same autocast."""
    s, n_in = _union_schedule("P")
    fused, plain = _layers("P", 3)
    _compare(fused, plain, s, n_in, 3, amp=True, rtol=3e-2, atol=3e-2)


def test_dag_kernels_read_row_strided_views():
    """q, k, v as column slices of one wider tensor (what the layer passes): no copies, same outputs and
    gradients as contiguous inputs."""
    s, _ = _union_schedule("P")
    n, h, k = s.num_nodes, 2, 4
    g = torch.Generator().manual_seed(6)
    wide = torch.randn(n, 3 * h * k + 7, generator=g).to(DEVICE).requires_grad_()
    gates = [torch.rand(*shape, generator=g).to(DEVICE) for shape in
             ((s.num_edges, h), (s.num_line_edges, h), (s.num_edges, h), (n, h))]
    views = [wide[:, 7 + i * h * k: 7 + (i + 1) * h * k].view(n, h, k) for i in range(3)]
    assert not views[1].is_contiguous() and kd._rows(views[1]) is views[1]
    y = plstm_dag(*views, *gates, s, backend="triton")
    w = torch.randn(y.shape, generator=g).to(DEVICE)
    (da,) = torch.autograd.grad((y * w).sum(), [wide])
    y2 = plstm_dag(*[t.contiguous() for t in views], *gates, s, backend="triton")
    (db,) = torch.autograd.grad((y2 * w).sum(), [wide])
    torch.testing.assert_close(y, y2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(da, db, rtol=1e-5, atol=1e-6)


def test_graph_heads_checks_its_input():
    s, _ = _union_schedule("D")
    b = [torch.zeros(2, device=DEVICE)] * 4
    with pytest.raises(ValueError, match=r"p must be \[N, 3 \* H \* K \+ 8 \* H\]"):
        kh.graph_heads_triton(torch.zeros(s.num_nodes, 10, device=DEVICE), None, b, s, 2, 4, 0.5, 5.0, False)
    with pytest.raises(ValueError, match="rows but the schedule has"):
        kh.graph_heads_triton(torch.zeros(3, 40, device=DEVICE), None, b, s, 2, 4, 0.5, 5.0, False)
    with pytest.raises(TypeError, match="projections"):
        kh.graph_heads_triton(torch.zeros(s.num_nodes, 40, dtype=torch.float64, device=DEVICE), None, b, s, 2, 4,
                              0.5, 5.0, False)


def test_merged_heads_without_edges():
    """A batch with nodes but no edges: only the direct term, the same as the readable layer (gradients too)."""
    s = compile_dag(torch.zeros(2, 0, dtype=torch.long), num_nodes=5, mode="P", device=DEVICE)
    fused, plain = _layers("P", 3)
    _compare(fused, plain, s, 0, 3)
