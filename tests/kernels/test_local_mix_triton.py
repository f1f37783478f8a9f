"""Fused local bond term (``kernels/local_mix.py``) against the readable ``h + LocalBondMix(h)``: output and
every gradient (node input, edge features, the edge projection), on hostile DAGs with and without edge features,
an oriented schedule (``input_edge_ids``) and an edge projection that is a column slice of a wider product.

Runs on CPU through the Triton interpreter (``TRITON_INTERPRET=1``), or on CUDA when a GPU is present.
"""

import pytest
import torch

from ._triton_setup import DEVICE  # noqa: E402,I001  (first: sets TRITON_INTERPRET, skips without triton)

from plstm_graph import compile_dag  # noqa: E402
from plstm_graph.nn.blocks import LocalBondMix  # noqa: E402

from ..conftest import hostile_dags, random_dag  # noqa: E402


def _run(mix, fused, h, schedule, edge_attr, ids, edge_preact=None):
    mix.fused = fused
    hh = h.detach().clone().requires_grad_(True)
    ea = edge_attr.detach().clone().requires_grad_(True) if edge_attr is not None else None
    out = mix.residual_add(hh, schedule.edge_index, ea, ids, edge_preact,
                           both_directions=None if fused else schedule.both_directions())
    torch.manual_seed(3)
    w = torch.randn_like(out)
    inputs = [hh] + ([ea] if ea is not None else []) + list(mix.parameters())
    return out, torch.autograd.grad((out * w).sum(), inputs)


@pytest.mark.parametrize("edge_dim", [None, 5])
def test_fused_local_mix_matches_readable(edge_dim):
    rows, off = [], 0
    for _, ei, n in hostile_dags() + [("random40", random_dag(40, 0.2, 7), 40)]:
        rows.append(ei + off)
        off += n
    s = compile_dag(torch.cat(rows, 1), num_nodes=off, mode="P", device=DEVICE)
    torch.manual_seed(0)
    mix = LocalBondMix(12, edge_dim).to(DEVICE)
    h = torch.randn(off, 12, device=DEVICE) * 2
    ea = torch.randn(s.num_edges, edge_dim, device=DEVICE) if edge_dim else None
    a, ga = _run(mix, True, h, s, ea, None)
    b, gb = _run(mix, False, h, s, ea, None)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-4)


def test_fused_local_mix_oriented_schedule_and_slice():
    """Undirected input oriented by compile_dag: edge rows are picked by input_edge_ids; the edge projection
    may be given precomputed as a column slice (what PLSTMGraphStack.edge_projections passes)."""
    und = torch.tensor([[0, 1, 1, 2, 2, 3, 0, 3, 3, 4], [1, 0, 2, 1, 3, 2, 3, 0, 4, 3]])
    s = compile_dag(und, num_nodes=5, mode="D", orientation="index", device=DEVICE)
    assert s.input_edge_ids is not None
    torch.manual_seed(1)
    mix = LocalBondMix(6, 3).to(DEVICE)
    h = torch.randn(5, 6, device=DEVICE)
    ea = torch.randn(und.size(1), 3, device=DEVICE)
    a, ga = _run(mix, True, h, s, ea, s.input_edge_ids)
    b, gb = _run(mix, False, h, s, ea, s.input_edge_ids)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    wide = torch.cat([torch.randn(und.size(1), 4, device=DEVICE), mix.edge(ea)], 1)[:, 4:]
    assert not wide.is_contiguous()
    mix.fused = True
    c = mix.residual_add(h, s.edge_index, ea, s.input_edge_ids, edge_preact=wide)
    torch.testing.assert_close(c, a.detach(), rtol=1e-6, atol=1e-6)


def test_fused_local_mix_bf16_input_and_no_edges():
    torch.manual_seed(2)
    mix = LocalBondMix(8, None, fused=True).to(DEVICE)
    s = compile_dag(random_dag(20, 0.3, 1), num_nodes=20, mode="P", device=DEVICE)
    h = torch.randn(20, 8, device=DEVICE).bfloat16()
    out = mix.residual_add(h, s.edge_index)
    assert out.dtype == torch.bfloat16
    ref = h.float() + LocalBondMix(8, None)(h.float(), s.edge_index)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    empty = compile_dag(torch.zeros(2, 0, dtype=torch.long), num_nodes=3, mode="P", device=DEVICE)
    x = torch.randn(3, 8, device=DEVICE, requires_grad=True)
    y = mix.residual_add(x, empty.edge_index)
    torch.testing.assert_close(y, x)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, torch.ones_like(x))


@pytest.mark.parametrize("self_term", ["base", "eps"])
def test_fused_gine_aggregation_matches_readable(self_term):
    """local_mix="gine": ReLU messages added to a separate base ``(1 + eps) h`` (gradients to both), passed as a
    tensor or made inside the Function from ``eps`` (what the blocks do); both against the readable form."""
    s = compile_dag(random_dag(30, 0.2, 4), num_nodes=30, mode="P", device=DEVICE)
    torch.manual_seed(5)
    mix = LocalBondMix(8, 3, activation="relu").to(DEVICE)
    eps = torch.tensor([0.25], device=DEVICE, requires_grad=True)
    h0 = torch.randn(30, 8, device=DEVICE)
    ea = torch.randn(s.num_edges, 3, device=DEVICE)
    outs = []
    for fused in (True, False):
        mix.fused = fused
        h = h0.clone().requires_grad_(True)
        self_kw = dict(base=h * (1 + eps)) if self_term == "base" or not fused else dict(eps=eps)
        out = mix.residual_add(h, s.edge_index, ea, None, None,
                               both_directions=None if fused else s.both_directions(), **self_kw)
        w = torch.randn_like(out, generator=torch.Generator(DEVICE).manual_seed(0))
        outs.append((out, torch.autograd.grad((out * w).sum(), [h, eps] + list(mix.parameters()))))
    (a, ga), (b, gb) = outs
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-4)


def test_fused_local_mix_takes_base_or_eps():
    from plstm_graph.kernels.local_mix import local_mix_triton

    h = torch.zeros(3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="base or eps, not both"):
        local_mix_triton(h, torch.tensor([[0], [1]], device=DEVICE), base=h, eps=torch.zeros(1, device=DEVICE))
