import os

import numpy as np
import pytest
import torch

# Interpreter mode lets the Triton kernels run (slowly) on CPU tensors; harmless when triton is absent.
os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def random_dag(num_nodes: int, p: float, seed: int, shuffle: bool = True) -> torch.Tensor:
    """Erdos-Renyi DAG: edges i -> j (i < j in a random hidden order) with probability p."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_nodes, generator=g) if shuffle else torch.arange(num_nodes)
    iu = torch.triu_indices(num_nodes, num_nodes, 1)
    keep = torch.rand(iu.shape[1], generator=g) < p
    return perm[iu[:, keep]]


def hostile_dags():
    """(name, edge_index, num_nodes) covering the shapes SPEC section 6 calls out."""
    chain = torch.stack([torch.arange(0, 29), torch.arange(1, 30)])
    fan_in = torch.stack([torch.arange(1, 12), torch.zeros(11, dtype=torch.long)])
    fan_out = torch.stack([torch.zeros(11, dtype=torch.long), torch.arange(1, 12)])
    diamond_tail = torch.tensor([[0, 0, 1, 2, 3, 3], [1, 2, 3, 3, 4, 5]])
    # two diamonds in series: the second merge node sees overlapping ancestors (D-mode prunes)
    double_diamond = torch.tensor([[0, 0, 1, 2, 3, 3, 4, 5, 6], [1, 2, 3, 3, 4, 5, 6, 6, 7]])
    disconnected = torch.cat([chain[:, :5], diamond_tail + 40], 1)
    # ids deliberately not in topological order
    perm = torch.tensor([7, 3, 0, 5, 1, 6, 2, 4])
    scrambled = perm[double_diamond]
    multi = torch.tensor([[0, 0, 1, 1], [1, 1, 2, 2]])  # parallel edges
    return [
        ("single_node", torch.zeros(2, 0, dtype=torch.long), 1),
        ("no_edges", torch.zeros(2, 0, dtype=torch.long), 5),
        ("one_edge", torch.tensor([[0], [1]]), 2),
        ("chain", chain, 30),
        ("fan_in", fan_in, 12),
        ("fan_out", fan_out, 12),
        ("diamond_tail", diamond_tail, 6),
        ("double_diamond", double_diamond, 8),
        ("disconnected", disconnected, 46),
        ("scrambled", scrambled, 8),
        ("multi_edges", multi, 3),
        ("random", random_dag(14, 0.35, 3), 14),
    ]


@pytest.fixture(params=hostile_dags(), ids=lambda c: c[0])
def hostile_dag(request):
    return request.param


__all__ = ["random_dag", "hostile_dags", "np"]
