"""Parallel ("path-sum") form of the pLSTM DAG operator: dense gating matrices per graph.

Per graph and head (SPEC section 2):

    G = Mk (I - Tl)^{-1} Sr                      # [N, N]: summed source * transitions * mark over paths
    y = ((Q K^T) * (G + diag(direct))) V

``G`` depends on the gates only. It is built by propagating, level by level, one row of path sums per
edge (``N_max`` numbers per head, instead of a ``K x V`` cell state), then the graph's nodes attend to
each other through one batched matmul per graph. Graphs of a batch are padded to the largest one, so the
attention costs ``N_max^2 (K + V)`` per graph and head: this path is for small graphs (molecules), where it
moves ~25x less memory than the state-based ``levels`` backend. Gradients: autograd through the dense ops
plus the ``levels`` backward for ``G``.
"""
from __future__ import annotations

import torch

from ...graph.schedule import DAGSchedule
from .levels import plstm_dag_levels

__all__ = ["plstm_dag_parallel", "MAX_PARALLEL_NODES"]

MAX_PARALLEL_NODES = 1024


def _local_rank(group: torch.Tensor, order_key: torch.Tensor, num_groups: int):
    """Position of every element inside its group when sorted by (group, order_key, id)."""
    n = group.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=group.device), 0
    key = group * (int(order_key.max()) + 1 if order_key.numel() else 1) + order_key
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(group, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=group.device) - starts[group[order]]
    return rank, int(counts.max())


def _layout(schedule: DAGSchedule):
    lay = schedule.cache.get("parallel")
    if lay is None:
        ng = max(schedule.num_graphs, 1)
        node_loc, n_max = _local_rank(schedule.graph_id, torch.zeros_like(schedule.graph_id), ng)
        if n_max > MAX_PARALLEL_NODES:
            raise ValueError(
                f"backend='parallel' builds dense [N, N] matrices per graph; the largest graph here has {n_max} "
                f"nodes (limit {MAX_PARALLEL_NODES}). Use backend='levels' for large graphs."
            )
        lay = dict(node_loc=node_loc, n_max=max(n_max, 1), ng=ng)
        schedule.cache["parallel"] = lay
    return lay


def gating_matrices(source, transition, mark, schedule: DAGSchedule) -> torch.Tensor:
    """Dense path-sum matrices ``G [num_graphs, H, N_max, N_max]`` (``G[g, h, n, u]``: from u to n).

    ``G = Mk (I - Tl)^{-1} Sr`` is the DAG operator itself with a one-hot value per node and ``q = k = 1``:
    the edge "state" of edge ``b`` is then the row vector of path sums from every node of its graph to
    ``b`` (``N_max`` numbers per head instead of ``K x V``), propagated level by level by the ``levels``
    backend (whose hand-written backward gives the gate gradients). Nodes are indexed by their position
    inside their graph (``schedule.cache['parallel']['node_loc']``).
    """
    lay = _layout(schedule)
    ng, n_max = lay["ng"], lay["n_max"]
    num_heads = source.shape[1]
    dtype, device = source.dtype, source.device
    n = schedule.num_nodes
    n_loc, gid = lay["node_loc"], schedule.graph_id
    ones = torch.ones(n, num_heads, 1, dtype=dtype, device=device)
    onehot = torch.nn.functional.one_hot(n_loc, n_max).to(dtype)[:, None, :].expand(n, num_heads, n_max)
    direct = torch.zeros(n, num_heads, dtype=dtype, device=device)
    rows = plstm_dag_levels(ones, ones, onehot.contiguous(), source, transition, mark, direct, schedule)
    gate = torch.zeros(ng, n_max, num_heads, n_max, dtype=dtype, device=device).index_put((gid, n_loc), rows)
    return gate.transpose(1, 2)  # [G, H, N_max (to), N_max (from)]


def plstm_dag_parallel(q, k, v, source, transition, mark, direct, schedule: DAGSchedule) -> torch.Tensor:
    """Dense per-graph operator; same contract as :func:`plstm_graph.plstm_dag`."""
    lay = _layout(schedule)
    ng, n_max = lay["ng"], lay["n_max"]
    n_loc, gid = lay["node_loc"], schedule.graph_id
    num_heads, dk, dv = q.shape[1], q.shape[2], v.shape[2]
    gate = gating_matrices(source, transition, mark, schedule)  # [G, H, Nm, Nm]
    dpad = torch.zeros(ng, n_max, num_heads, dtype=q.dtype, device=q.device).index_put((gid, n_loc), direct)
    gate = gate + torch.diag_embed(dpad.transpose(1, 2))
    qp = torch.zeros(ng, n_max, num_heads, dk, dtype=q.dtype, device=q.device).index_put((gid, n_loc), q)
    kp = torch.zeros(ng, n_max, num_heads, dk, dtype=q.dtype, device=q.device).index_put((gid, n_loc), k)
    vp = torch.zeros(ng, n_max, num_heads, dv, dtype=q.dtype, device=q.device).index_put((gid, n_loc), v)
    qp, kp, vp = (x.transpose(1, 2) for x in (qp, kp, vp))  # [G, H, Nm, .]
    att = (qp @ kp.transpose(-1, -2)) * gate
    yp = (att @ vp).transpose(1, 2)  # [G, Nm, H, V]
    return yp[gid, n_loc]
