"""PyG batching of schedules: a batch costs a concatenation and equals compiling the union."""
import pytest
import torch
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader

from plstm_graph import compile_dag
from plstm_graph.graph import AttachSchedules, attach_schedules, schedule_from_batch

from ..conftest import hostile_dags


def _graphs():
    return [Data(edge_index=ei, num_nodes=n, x=torch.randn(n, 3), edge_attr=torch.randn(ei.shape[1], 2))
            for _, ei, n in hostile_dags()]


@pytest.mark.parametrize("mode", ["P", "D"])
@pytest.mark.parametrize("reverse", [False, True])
def test_batched_schedule_equals_union(mode, reverse):
    graphs = [attach_schedules(g) for g in _graphs()]
    batch = next(iter(DataLoader(graphs, batch_size=len(graphs))))
    s = batch.schedule(mode, reverse)
    union_ei = batch.edge_index
    u = compile_dag(union_ei.flip(0) if reverse else union_ei, batch.num_nodes, mode)
    assert torch.equal(s.edge_index, u.edge_index)
    assert set(map(tuple, s.line_index.T.tolist())) == set(map(tuple, u.line_index.T.tolist()))
    assert s.num_line_edges == u.num_line_edges
    assert torch.equal(s.node_level, u.node_level)
    assert s.num_levels == u.num_levels
    assert s.num_graphs == len(graphs) and torch.equal(s.graph_id, batch.batch)
    assert batch.schedule(mode, reverse) is s  # cached on the batch


def test_levels_are_not_offset_and_line_ids_are():
    g = attach_schedules(Data(edge_index=torch.tensor([[0, 1], [1, 2]]), num_nodes=3))
    batch = next(iter(DataLoader([g, g], batch_size=2)))
    assert batch.P_node_level.tolist() == [0, 1, 2, 0, 1, 2]
    assert batch.P_line_index.tolist() == [[0, 2], [1, 3]]


def test_attach_orients_and_keeps_edge_features_aligned():
    ei = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])  # undirected path, both directions
    attr = torch.tensor([[10.0], [10.0], [20.0], [20.0]])
    g = attach_schedules(Data(edge_index=ei, edge_attr=attr, num_nodes=3), orientation="index")
    assert g.edge_index.tolist() == [[0, 1], [1, 2]]
    assert g.edge_attr.flatten().tolist() == [10.0, 20.0]
    with pytest.raises(ValueError, match="orientation="):
        attach_schedules(Data(edge_index=ei, num_nodes=3))


def test_missing_schedule_is_a_clear_error():
    g = attach_schedules(Data(edge_index=torch.tensor([[0], [1]]), num_nodes=2), modes=("P",), reverse=False)
    with pytest.raises(ValueError, match="carries no 'D' schedule"):
        schedule_from_batch(g, "D")
    t = AttachSchedules(modes=("D",), reverse=False)
    assert "AttachSchedules" in repr(t)
    assert t(Data(edge_index=torch.tensor([[0], [1]]), num_nodes=2)).schedule("D").num_edges == 1
