import io

import pytest
import torch
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader

from plstm_graph import compile_dag
from plstm_graph.graph import attach_schedules
from plstm_graph.models import PLSTMGraphModel
from plstm_graph.nn import (AttentionReadout, MeanReadout, PLSTMGraphBlock, PLSTMGraphStack, SumReadout,
                            default_pattern, make_readout)

from .graph_factories import random_dag


def _batch(num=4, seed=0, edge_dim=3):
    gen = torch.Generator().manual_seed(seed)
    gs = []
    for i in range(num):
        n = 3 + i * 2
        ei = random_dag(n, 0.4, gen)
        gs.append(attach_schedules(Data(x=torch.randn(n, 5, generator=gen), edge_index=ei,
                                        edge_attr=torch.randn(ei.size(1), edge_dim, generator=gen),
                                        y=torch.randn(1, 2, generator=gen), num_nodes=n)))
    return gs, next(iter(DataLoader(gs, batch_size=num)))


def test_default_pattern():
    assert default_pattern(4) == [("P", False), ("P", True), ("D", False), ("D", True)]
    assert default_pattern(2) == [("P", False), ("D", False)]
    s = PLSTMGraphStack(8, 2)
    assert [(b.layer.mode, b.layer.reverse) for b in s.blocks] == default_pattern(4)


def test_block_is_residual_prenorm():
    s = compile_dag(torch.tensor([[0, 1], [1, 2]]), 3, mode="P")
    block = PLSTMGraphBlock(8, 2, mode="P")
    with torch.no_grad():
        block.layer.out_proj.weight.zero_()
        block.mlp[-1].weight.zero_()
        block.mlp[-1].bias.zero_()
    x = torch.randn(3, 8)
    torch.testing.assert_close(block(x, s), x)  # zero branches -> identity


def test_stack_schedule_forms_agree():
    gs, batch = _batch()
    g = gs[2]
    stack = PLSTMGraphStack(8, 2, edge_dim=3)
    x = torch.randn(g.num_nodes, 8)
    by_batch = stack(x, g, g.edge_attr)
    scheds = {(m, r): g.schedule(m, r) for m, r in stack.pattern}
    torch.testing.assert_close(stack(x, scheds, g.edge_attr), by_batch)
    torch.testing.assert_close(stack(x, [scheds[p] for p in stack.pattern], g.edge_attr), by_batch)
    with pytest.raises(ValueError, match="single DAGSchedule"):
        stack(x, g.schedule("P"), g.edge_attr)
    with pytest.raises(ValueError, match="got 2 schedules"):
        stack(x, [g.schedule("P"), g.schedule("D")], g.edge_attr)
    with pytest.raises(ValueError, match="pattern modes"):
        PLSTMGraphStack(8, 2, pattern=[("X", False)])


def test_readouts():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    b = torch.tensor([0, 0, 2])
    assert SumReadout()(x, b, 3).tolist() == [[4.0, 6.0], [0.0, 0.0], [5.0, 6.0]]
    assert MeanReadout()(x, b, 3).tolist() == [[2.0, 3.0], [0.0, 0.0], [5.0, 6.0]]
    att = AttentionReadout(2, num_heads=2)
    out = att(x, b, 3)
    # zero score init = uniform attention = the mean of the value projection
    torch.testing.assert_close(out, MeanReadout()(att.value(x), b, 3))
    with torch.no_grad():
        att.score.weight.copy_(torch.tensor([[1000.0, 0.0], [0.0, -1000.0]]))
    out = att(x, b, 3)  # head 0 picks the node with the largest x0, head 1 the smallest x1
    v = att.value(x)
    torch.testing.assert_close(out[0], torch.stack([v[1, 0], v[0, 1]]))
    assert torch.isfinite(att(x * 1e4, b, 3)).all()
    with pytest.raises(ValueError):
        make_readout("max", 4)


@pytest.mark.parametrize("readout", ["sum", "mean", "attention"])
def test_model_graph_task_and_state_dict_roundtrip(readout, tmp_path):
    gs, batch = _batch()
    torch.manual_seed(0)
    model = PLSTMGraphModel(5, 16, 2, num_heads=2, num_layers=4, edge_in_dim=3, readout=readout)
    out = model(batch)
    assert out.shape == (4, 2)
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    model2 = PLSTMGraphModel(5, 16, 2, num_heads=2, num_layers=4, edge_in_dim=3, readout=readout)
    model2.load_state_dict(torch.load(path, weights_only=True))
    torch.testing.assert_close(model2(batch), out)
    # training step works and changes the prediction
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss = (model(batch) - batch.y).pow(2).mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()
    assert not torch.allclose(model(batch), out)


def test_model_node_task():
    gs, batch = _batch()
    model = PLSTMGraphModel(5, 16, 3, num_heads=2, num_layers=2, task="node", pattern=[("P", False), ("D", True)])
    assert model(batch).shape == (batch.num_nodes, 3)
    with pytest.raises(ValueError, match="task"):
        PLSTMGraphModel(5, 16, 3, task="edge")
    model_e = PLSTMGraphModel(5, 16, 3, edge_in_dim=3)
    del batch.edge_attr
    with pytest.raises(ValueError, match="edge_attr"):
        model_e(batch)


def test_local_bond_mix_sums_both_directions_and_uses_bond_features():
    from plstm_graph.nn import LocalBondMix

    mix = LocalBondMix(4, edge_dim=None)
    h = torch.randn(3, 4)
    out = mix(h, torch.tensor([[0, 1], [1, 2]]))  # path 0 - 1 - 2
    gelu = torch.nn.functional.gelu
    torch.testing.assert_close(out, torch.stack([gelu(h[1]), gelu(h[0]) + gelu(h[2]), gelu(h[1])]))
    mix_e = LocalBondMix(4, edge_dim=2)
    e = torch.randn(2, 2)
    out_e = mix_e(h, torch.tensor([[0, 1], [1, 2]]), e)
    assert not torch.allclose(out_e, mix_e(h, torch.tensor([[0, 1], [1, 2]]), e + 1.0))  # bonds matter
    torch.testing.assert_close(out_e[0], gelu(h[1] + mix_e.edge(e[0])))
    with pytest.raises(ValueError, match="edge_attr"):
        mix_e(h, torch.tensor([[0, 1], [1, 2]]))


def test_block_local_mix_changes_output_gets_gradients_and_agrees_across_schedule_forms():
    gs, batch = _batch()
    torch.manual_seed(0)
    stack = PLSTMGraphStack(8, 2, edge_dim=3, local_mix=True)
    plain = PLSTMGraphStack(8, 2, edge_dim=3)
    assert all(b.local is not None for b in stack.blocks) and all(b.local is None for b in plain.blocks)
    x = torch.randn(batch.num_nodes, 8, requires_grad=True)
    y = stack(x, batch, batch.edge_attr)
    assert y.shape == (batch.num_nodes, 8)
    y.pow(2).sum().backward()
    for b in stack.blocks:
        assert b.local.edge.weight.grad is not None and b.local.edge.weight.grad.abs().sum() > 0
    # same output from a dict of schedules; zeroing the local term's bond map changes the output
    g = gs[3]
    xg = torch.randn(g.num_nodes, 8)
    by_batch = stack(xg, g, g.edge_attr)
    torch.testing.assert_close(stack(xg, {(m, r): g.schedule(m, r) for m, r in stack.pattern}, g.edge_attr), by_batch)
    with torch.no_grad():
        for b in stack.blocks:
            b.local.edge.weight.zero_()
    assert not torch.allclose(stack(xg, g, g.edge_attr), by_batch)


def test_block_layer_scale_scales_the_layer_branch_and_learns():
    s = compile_dag(torch.tensor([[0, 1], [1, 2]]), 3, mode="P")
    torch.manual_seed(0)
    block = PLSTMGraphBlock(8, 2, mode="P", layer_scale=0.1)
    torch.testing.assert_close(block.layer_scale.detach(), torch.full((8,), 0.1))
    x = torch.randn(3, 8)
    with torch.no_grad():
        block.mlp[-1].weight.zero_()
        block.mlp[-1].bias.zero_()
    full = block.layer(block.norm1(x), s)
    torch.testing.assert_close(block(x, s), x + 0.1 * full)  # the MLP branch is zero here
    block(x, s).pow(2).sum().backward()
    assert block.layer_scale.grad is not None and block.layer_scale.grad.abs().sum() > 0
    with torch.no_grad():
        block.layer_scale.zero_()
    torch.testing.assert_close(block(x, s), x)
    block.reset_parameters()
    torch.testing.assert_close(block.layer_scale.detach(), torch.full((8,), 0.1))
    assert PLSTMGraphBlock(8, 2, mode="P").layer_scale is None
