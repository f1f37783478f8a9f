"""The seeded benchmark DAG generators (``plstm_graph.bench.graphs``): acyclic, seeded, the sizes they promise."""
import torch

from plstm_graph import compile_dag
from plstm_graph.bench.graphs import random_dag


def test_random_dag_is_a_seeded_layered_dag():
    ei, n = random_dag(4000, seed=3, depth=16)
    ei2, n2 = random_dag(4000, seed=3, depth=16)
    assert n == n2 == 1000 and torch.equal(ei, ei2)
    assert not torch.equal(ei, random_dag(4000, seed=4, depth=16)[0])
    layer = torch.arange(n) * 16 // n
    span = layer[ei[1]] - layer[ei[0]]
    assert ((span >= 1) & (span <= 3)).all()  # forward 1-3 layers: acyclic, with skip edges
    assert 3500 < ei.shape[1] <= 4000 and ei.unique(dim=1).shape[1] == ei.shape[1]
    s = compile_dag(ei, num_nodes=n)  # compile_dag rejects cycles
    assert s.num_edges == ei.shape[1] and s.num_levels >= 15
