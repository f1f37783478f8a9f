"""Fused gate kernels (``kernels/graph_gates.py``) against the readable gates of ``PLSTMGraphLayer``: every
output and every gradient (node input, edge features, all parameters), on hostile DAGs, both modes, with and
without edge features and P-normalisation, oriented schedules (``input_edge_ids``), gate sums far above 1
(the normalisation active), half-precision pre-activations and column slices read in place.

Runs on CPU through the Triton interpreter (``TRITON_INTERPRET=1``), or on CUDA when a GPU is present.
"""

import pytest
import torch

from ._triton_setup import DEVICE  # noqa: E402,I001  (first: sets TRITON_INTERPRET, skips without triton)

from plstm_graph import compile_dag  # noqa: E402
from plstm_graph.kernels import graph_gates as kg  # noqa: E402
from plstm_graph.nn import PLSTMGraphLayer  # noqa: E402

from ..conftest import hostile_dags, random_dag  # noqa: E402


def _union(cases):
    """One disjoint union of the hostile DAGs (the kernels must keep components apart) plus a random DAG."""
    rows, off = [], 0
    for _, ei, n in cases:
        rows.append(ei + off)
        off += n
    return torch.cat(rows, 1), off


def _pair(mode, edge_dim, normalize=True, bias=0.0, std=0.5, heads=3):
    """A layer with the fused kernels and one with the readable form, same parameters."""
    torch.manual_seed(0)
    kw = dict(mode=mode, edge_dim=edge_dim, gate_init_std=std, normalize=normalize,
              source_bias=bias, mark_bias=bias, direct_bias=bias, transition_bias=bias)
    fused = PLSTMGraphLayer(6 * heads, heads, fused_gates=True, **kw).to(DEVICE)
    plain = PLSTMGraphLayer(6 * heads, heads, fused_gates=False, **kw).to(DEVICE)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def _compare(fused, plain, x, schedule, e, rtol=1e-5, atol=1e-6):
    outs = []
    for layer in (fused, plain):
        xi = x.detach().clone().requires_grad_(True)
        ei = e.detach().clone().requires_grad_(True) if e is not None else None
        gates = layer.gates(xi, schedule, ei)
        torch.manual_seed(1)
        w = [torch.randn_like(t) for t in gates]
        loss = sum((t * wi).sum() for t, wi in zip(gates, w))
        inputs = [xi] + ([ei] if ei is not None else []) + list(layer.parameters())
        outs.append((gates, torch.autograd.grad(loss, inputs, allow_unused=True)))
    (ga, da), (gb, db) = outs
    for name, a, b in zip(("source", "transition", "mark", "direct"), ga, gb):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        torch.testing.assert_close(a, b.float(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    for i, (a, b) in enumerate(zip(da, db)):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any()), i
        else:
            assert a.dtype == b.dtype, i
            torch.testing.assert_close(a.float(), b.float(), rtol=rtol * 10, atol=atol * 10,
                                       msg=lambda m: f"grad {i}: {m}")


@pytest.mark.parametrize("mode", ["P", "D"])
@pytest.mark.parametrize("edge_dim", [None, 5])
def test_fused_gates_match_readable_on_hostile_dags(mode, edge_dim):
    ei, n = _union(hostile_dags() + [("random40", random_dag(40, 0.2, 7), 40)])
    s = compile_dag(ei, num_nodes=n, mode=mode, device=DEVICE)
    fused, plain = _pair(mode, edge_dim)
    x = torch.randn(n, fused.dim, device=DEVICE)
    e = torch.randn(s.num_edges, edge_dim, device=DEVICE) if edge_dim else None
    _compare(fused, plain, x, s, e)


@pytest.mark.parametrize("normalize", [True, False])
def test_fused_gates_normalisation_active(normalize):
    """Biases +3: sigmoid ~0.95 per out-edge, so fan-outs sum far above 1 and the P rule divides (and its
    backward's group term is exercised); tanh transitions of both signs."""
    ei = torch.cat([torch.stack([torch.zeros(9, dtype=torch.long), torch.arange(1, 10)]),  # fan-out from 0
                    torch.stack([torch.arange(1, 10), torch.full((9,), 10)]),  # all into 10
                    torch.tensor([[10, 10, 10], [11, 12, 13]])], 1)
    s = compile_dag(ei, num_nodes=14, mode="P", device=DEVICE)
    fused, plain = _pair("P", 4, normalize=normalize, bias=3.0, std=1.0)
    x = torch.randn(14, fused.dim, device=DEVICE)
    e = torch.randn(s.num_edges, 4, device=DEVICE)
    gates = fused.gates(x, s, e)
    if normalize:
        tail = s.edge_index[0]
        total = torch.zeros(14, fused.num_heads, device=DEVICE).index_add(0, tail, gates.source.abs())
        assert total.max() <= 1 + 1e-5 and total.max() > 0.99  # the rule was active
    _compare(fused, plain, x, s, e)


def test_fused_gates_oriented_schedule_and_slices():
    """An undirected input oriented by compile_dag (input_edge_ids), edge features with more rows than edges,
    and node / edge pre-activations that are column slices of a wider product (read in place)."""
    und = torch.tensor([[0, 1, 1, 2, 2, 3, 0, 3], [1, 0, 2, 1, 3, 2, 3, 0]])  # a 4-cycle, both directions
    s = compile_dag(und, num_nodes=4, mode="P", orientation="index", device=DEVICE)
    assert s.input_edge_ids is not None
    fused, plain = _pair("P", 3)
    x = torch.randn(4, fused.dim, device=DEVICE)
    e = torch.randn(und.size(1), 3, device=DEVICE)
    _compare(fused, plain, x, s, e)
    # column slices: what PLSTMGraphLayer.heads passes (split of the stacked q/k/v/gate projection)
    wide = torch.randn(4, 5 + 8 * fused.num_heads, device=DEVICE)
    g = wide[:, 5:]
    assert not g.is_contiguous()
    pre = torch.randn(und.size(1), 2 + 4 * fused.num_heads, device=DEVICE)[:, 2:]
    zero = torch.zeros(fused.num_heads, device=DEVICE)
    out = kg.graph_gates_triton(g, pre, zero, zero, zero, zero, s.edge_index, s.line_index, s.input_edge_ids,
                                fused.num_heads, 5.0, True)
    ref = kg.graph_gates_triton(g.contiguous(), pre.contiguous(), zero, zero, zero, zero, s.edge_index,
                                s.line_index, s.input_edge_ids, fused.num_heads, 5.0, True)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_gates_half_precision_preactivations(dtype):
    """Under autocast the projections are bf16: the kernels read them as they are and return float32 gates,
    and the gradients come back in the input's dtype (against the readable form fed the same rounded values)."""
    ei = random_dag(25, 0.25, 5)
    s = compile_dag(ei, num_nodes=25, mode="P", device=DEVICE)
    h = 2
    g = torch.randn(25, 8 * h, device=DEVICE).to(dtype).requires_grad_(True)
    pre = torch.randn(s.num_edges, 4 * h, device=DEVICE).to(dtype).requires_grad_(True)
    biases = [torch.randn(h, device=DEVICE, requires_grad=True) for _ in range(4)]
    out = kg.graph_gates_triton(g, pre, *biases, s.edge_index, s.line_index, None, h, 5.0, True)
    torch.manual_seed(2)
    w = [torch.randn_like(t) for t in out]
    grads = torch.autograd.grad(sum((t * wi).sum() for t, wi in zip(out, w)), [g, pre] + biases)
    assert grads[0].dtype == dtype and grads[1].dtype == dtype

    layer = PLSTMGraphLayer(4 * h, h, mode="P", edge_dim=1, fused_gates=False).to(DEVICE)
    with torch.no_grad():
        for name, b in zip(("source_bias", "mark_bias", "transition_bias", "direct_bias"), biases):
            getattr(layer, name).copy_(b)
    g32 = g.detach().float().requires_grad_(True)
    pre32 = pre.detach().float().requires_grad_(True)
    ref = layer._gates(torch.zeros(25, 4 * h, device=DEVICE), s, torch.zeros(s.num_edges, 1, device=DEVICE),
                       node_preact=g32, edge_preact=pre32)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    rgrads = torch.autograd.grad(sum((t * wi).sum() for t, wi in zip(ref, w)),
                                 [g32, pre32, layer.source_bias, layer.mark_bias, layer.transition_bias,
                                  layer.direct_bias])
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a.float(), b.to(dtype).float() if a.dtype != torch.float32 else b,
                                   rtol=2e-2, atol=1e-2)


def test_fused_gates_in_a_molecule_stack_step():
    """A whole stack forward + backward with fused gates equals the readable one (the path the molecule model
    takes on CUDA), on a batch of small DAGs; the readable path is the one taken for float64."""
    from torch_geometric.data import Batch, Data

    from plstm_graph.graph import attach_schedules
    from plstm_graph.nn import PLSTMGraphStack

    graphs = []
    for seed in range(6):
        ei = random_dag(9, 0.3, seed)
        graphs.append(attach_schedules(Data(edge_index=ei, num_nodes=9, edge_attr=torch.randn(ei.size(1), 4))))
    batch = Batch.from_data_list(graphs).to(DEVICE)
    torch.manual_seed(0)
    a = PLSTMGraphStack(16, 2, edge_dim=4, local_mix=True, layer_scale=0.1, fused_gates=True).to(DEVICE)
    b = PLSTMGraphStack(16, 2, edge_dim=4, local_mix=True, layer_scale=0.1, fused_gates=False).to(DEVICE)
    b.load_state_dict(a.state_dict())
    x = torch.randn(batch.num_nodes, 16, device=DEVICE)
    ya, yb = a(x, batch, edge_attr=batch.edge_attr), b(x, batch, edge_attr=batch.edge_attr)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
    ga = torch.autograd.grad(ya.square().sum(), list(a.parameters()))
    gb = torch.autograd.grad(yb.square().sum(), list(b.parameters()))
    for p, q in zip(ga, gb):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)
    assert not a.blocks[0].layer._fused_gates(torch.zeros(1, dtype=torch.float64))


def test_fused_gates_unavailable_is_a_clear_error(monkeypatch):
    from plstm_graph.nn import graph as G

    monkeypatch.setattr(G, "_gate_kernels_available", lambda: False)
    layer = PLSTMGraphLayer(8, 2, fused_gates=True)
    with pytest.raises(RuntimeError, match="fused_gates=True needs the triton package"):
        layer._fused_gates(torch.zeros(1))
    assert not PLSTMGraphLayer(8, 2)._fused_gates(torch.zeros(1))  # auto: readable form
