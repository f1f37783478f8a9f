import networkx as nx
import numpy as np
import pytest
import torch
from torch_geometric.loader import DataLoader

from plstm_graph.datasets.longrange import NUM_FEATURES, longrange_dataset, make_longrange_graph


@pytest.fixture(scope="module")
def graphs():
    return longrange_dataset(6, seed=3, modes=("P",), reverse=False)


def test_deterministic_in_seed():
    a = make_longrange_graph(np.random.default_rng(5))
    b = make_longrange_graph(np.random.default_rng(5))
    c = make_longrange_graph(np.random.default_rng(6))
    assert torch.equal(a.x, b.x) and torch.equal(a.edge_index, b.edge_index) and torch.equal(a.y, b.y)
    assert not (a.num_nodes == c.num_nodes and torch.equal(a.edge_index, c.edge_index))


def test_labels_are_the_key_token_far_upstream(graphs):
    for g in graphs:
        assert g.x.shape == (g.num_nodes, NUM_FEATURES)
        G = nx.DiGraph()
        G.add_nodes_from(range(g.num_nodes))
        G.add_edges_from(g.edge_index.t().tolist())
        assert nx.is_directed_acyclic_graph(G)
        sinks = torch.nonzero(g.label_mask).flatten().tolist()
        assert sinks and all(g.x[s, 2] == 1 for s in sinks)
        for s in sinks:
            keys = [u for u in nx.ancestors(G, s) if g.x[u, 0] == 1]
            assert len(keys) == 1  # exactly one key among the sink's ancestors
            key = keys[0]
            paths = list(nx.all_simple_paths(G, key, s))
            assert len(paths) == 1  # the path from the key is unique
            hops = len(paths[0]) - 1
            assert 30 <= hops <= 60 and hops == int(g.hops[s])
            assert int(g.y[s]) == int(g.x[key, 1] > 0)  # label = the key's token
            # an r-hop receptive field (r <= 10) around the sink holds no key
            near = nx.single_source_shortest_path_length(G.reverse(copy=False), s, cutoff=10)
            assert all(g.x[u, 0] == 0 for u in near)
        assert torch.all(g.y[~g.label_mask] == -1)


def test_labels_balanced_and_depth():
    gs = longrange_dataset(40, seed=0, modes=("P",), reverse=False)
    ys = torch.cat([g.y[g.label_mask] for g in gs]).float()
    assert 0.3 < float(ys.mean()) < 0.7
    levels = [g.schedule("P").num_levels - 1 for g in gs]  # longest path, in hops
    assert min(levels) >= 30 and max(levels) <= 60 + 4


def test_batches_with_schedules(graphs):
    batch = next(iter(DataLoader(graphs, batch_size=3)))
    s = batch.schedule("P")
    assert s.num_nodes == batch.num_nodes and s.num_graphs == 3
    with pytest.raises(ValueError, match="D"):
        batch.schedule("D")


def test_bad_depth():
    with pytest.raises(ValueError, match="min_depth"):
        make_longrange_graph(np.random.default_rng(0), min_depth=10, max_depth=5)
