"""Issue item 4: a layer on a disjoint union of graphs (PyG DataLoader) equals the layer on each graph."""
import pytest
import torch
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader

from plstm_graph.graph import attach_schedules
from plstm_graph.nn import PLSTMGraphLayer, PLSTMGraphStack

from graph_factories import chain_dag, random_dag


def _graphs():
    gen = torch.Generator().manual_seed(7)
    edge_sets = [
        (torch.zeros(2, 0, dtype=torch.long), 1),  # a single node
        (torch.zeros(2, 0, dtype=torch.long), 3),  # no edges
        (chain_dag(13), 13),  # a long chain
        (torch.stack([torch.arange(1, 8), torch.zeros(7, dtype=torch.long)]), 8),  # wide fan-in
        (random_dag(9, 0.4, gen), 9),
        (random_dag(11, 0.25, gen), 11),  # possibly disconnected
    ]
    out = []
    for ei, n in edge_sets:
        d = Data(x=torch.randn(n, 8, generator=gen), edge_index=ei, edge_attr=torch.randn(ei.size(1), 3, generator=gen),
                 num_nodes=n)
        out.append(attach_schedules(d, modes=("P", "D"), reverse=True))
    return out


@pytest.mark.parametrize("mode", ["P", "D"])
@pytest.mark.parametrize("reverse", [False, True])
def test_layer_batch_equals_each_graph(mode, reverse):
    torch.manual_seed(0)
    graphs = _graphs()
    layer = PLSTMGraphLayer(8, 2, mode=mode, reverse=reverse, edge_dim=3, gate_init_std=0.3)
    batch = next(iter(DataLoader(graphs, batch_size=len(graphs), shuffle=False)))
    x = batch.x.clone().requires_grad_()
    y = layer(x, batch, batch.edge_attr)
    alone = torch.cat([layer(g.x, g, g.edge_attr) for g in graphs])
    torch.testing.assert_close(y, alone, atol=1e-5, rtol=1e-5)
    # gradients too: a graph's output never depends on another graph's input
    y[: graphs[0].num_nodes + graphs[1].num_nodes + graphs[2].num_nodes].sum().backward()
    tail = sum(g.num_nodes for g in graphs[:3])
    assert torch.all(x.grad[tail:] == 0)


def test_stack_batch_equals_each_graph():
    torch.manual_seed(0)
    graphs = _graphs()
    stack = PLSTMGraphStack(8, 2, num_layers=4, edge_dim=3)
    batch = next(iter(DataLoader(graphs, batch_size=4, shuffle=False)))
    y = stack(batch.x, batch, batch.edge_attr)
    alone = torch.cat([stack(g.x, g, g.edge_attr) for g in graphs[:4]])
    torch.testing.assert_close(y, alone, atol=1e-5, rtol=1e-5)
