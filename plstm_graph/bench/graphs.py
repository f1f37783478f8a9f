"""Seeded synthetic DAGs for benchmarks and tests (no downloads)."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["molecule_like_dag", "molecule_like_batch", "layered_dag", "random_dag"]


def molecule_like_dag(num_nodes: int, rng: np.random.Generator, ring_closures: int = 2) -> np.ndarray:
    """A random tree plus a few ring closures over ``num_nodes`` atoms, oriented low id -> high id
    (the way canonical atom ranks orient a molecule). Returns ``edge_index [2, E]``."""
    parents = np.array([rng.integers(0, max(i, 1)) for i in range(1, num_nodes)], dtype=np.int64)
    child = np.arange(1, num_nodes, dtype=np.int64)
    pairs = set(zip(parents.tolist(), child.tolist()))
    for _ in range(ring_closures):
        if num_nodes < 6:
            break
        u = int(rng.integers(0, num_nodes - 5))
        w = int(u + rng.integers(4, min(7, num_nodes - u)))
        pairs.add((u, w))
    e = np.array(sorted(pairs), dtype=np.int64).T
    return e.reshape(2, -1)


def molecule_like_batch(num_graphs: int = 128, min_nodes: int = 15, max_nodes: int = 40, seed: int = 0):
    """``num_graphs`` molecule-like DAGs as one disjoint union: ``(edge_index, num_nodes, graph_id)``."""
    rng = np.random.default_rng(seed)
    eis, gids, off = [], [], 0
    for g in range(num_graphs):
        n = int(rng.integers(min_nodes, max_nodes + 1))
        eis.append(molecule_like_dag(n, rng) + off)
        gids.append(np.full(n, g, dtype=np.int64))
        off += n
    return torch.from_numpy(np.concatenate(eis, 1)), off, torch.from_numpy(np.concatenate(gids))


def layered_dag(num_edges: int, num_layers: int = 100, avg_degree: float = 2.5, seed: int = 0):
    """A random layered DAG with ``num_edges`` edges: nodes in ``num_layers`` layers, edges from each layer
    mostly to the next few; node ids are shuffled (not in topological order). Returns (edge_index, N)."""
    rng = np.random.default_rng(seed)
    n = max(int(num_edges / avg_degree), num_layers + 1)
    layer = np.sort(rng.integers(0, num_layers, n))
    starts = np.searchsorted(layer, np.arange(num_layers + 1))
    tails = rng.integers(0, starts[num_layers - 1], num_edges)
    jump = 1 + rng.geometric(0.6, num_edges) - 1
    tl = np.minimum(layer[tails] + jump, num_layers - 1)
    lo, hi = starts[tl], starts[tl + 1]
    heads = lo + (rng.random(num_edges) * np.maximum(hi - lo, 1)).astype(np.int64)
    ok = layer[heads] > layer[tails]
    tails, heads = tails[ok], heads[ok]
    perm = rng.permutation(n)
    return torch.from_numpy(np.stack([perm[tails], perm[heads]])), n


def random_dag(num_edges: int, seed: int = 0, depth: int = 64):
    """One large random DAG (one giant component): ``num_edges / 4`` nodes spread over ``depth`` layers,
    every edge from a node to a random node 1-3 layers further (so skip edges cross levels); duplicate
    edges are merged. Returns ``(edge_index [2, E], num_nodes)``."""
    gen = torch.Generator().manual_seed(seed)
    n = max(2 * depth, num_edges // 4)
    layer = torch.arange(n) * depth // n  # sorted layers
    start = torch.searchsorted(layer, torch.arange(depth + 1))
    u = torch.randint(0, int(start[depth - 1]), (num_edges,), generator=gen)
    lw = torch.clamp(layer[u] + torch.randint(1, 4, (num_edges,), generator=gen), max=depth - 1)
    w = start[lw] + (torch.rand(num_edges, generator=gen) * (start[lw + 1] - start[lw])).long()
    return torch.unique(torch.stack([u, w]), dim=1), n
