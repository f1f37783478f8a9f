"""Parallel ("path-sum") form of the pLSTM DAG operator: dense gating matrices per graph.

Per graph and head (SPEC section 2):

    G = Mk (I - Tl)^{-1} Sr                      # [N, N]: summed source * transitions * mark over paths
    y = ((Q K^T) * (G + diag(direct))) V

``Sr`` (E x N) holds sources at edge tails, ``Tl`` (E x E) the weighted line graph and ``Mk`` (N x E) the
marks at edge heads. Edges are laid out per graph in level order, so ``Tl`` is strictly lower triangular
and ``(I - Tl)^{-1} Sr`` is one unit-triangular solve. Graphs of a batch are padded to the largest one;
cost grows as ``E_max^3`` per graph and head, so this path is for small graphs (molecules), where it
replaces ``num_levels`` sequential steps by a handful of batched dense kernels. Gradients come from
autograd through the dense ops.
"""
from __future__ import annotations

import torch

from ...graph.schedule import DAGSchedule

__all__ = ["plstm_dag_parallel", "MAX_PARALLEL_EDGES"]

MAX_PARALLEL_EDGES = 2048


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
        edge_loc, e_max = _local_rank(schedule.edge_graph, schedule.edge_level, ng)
        if e_max > MAX_PARALLEL_EDGES:
            raise ValueError(
                f"backend='parallel' builds dense [E, E] matrices per graph; the largest graph here has {e_max} "
                f"edges (limit {MAX_PARALLEL_EDGES}). Use backend='levels' for large graphs."
            )
        lay = dict(node_loc=node_loc, edge_loc=edge_loc, n_max=max(n_max, 1), e_max=max(e_max, 1), ng=ng)
        schedule.cache["parallel"] = lay
    return lay


def gating_matrices(source, transition, mark, schedule: DAGSchedule) -> torch.Tensor:
    """Dense path-sum matrices ``G [num_graphs, H, N_max, N_max]`` (``G[g, h, n, u]``: from u to n).

    Nodes are indexed by their position inside their graph (``schedule.cache['parallel']['node_loc']``).
    """
    lay = _layout(schedule)
    ng, n_max, e_max = lay["ng"], lay["n_max"], lay["e_max"]
    num_heads = source.shape[1] if source.dim() == 2 else mark.shape[1]
    dtype, device = source.dtype, source.device
    tails, heads = schedule.edge_index
    e_loc, n_loc = lay["edge_loc"], lay["node_loc"]
    eg = schedule.edge_graph
    sr = torch.zeros(ng, e_max, n_max, num_heads, dtype=dtype, device=device)
    sr = sr.index_put((eg, e_loc, n_loc[tails]), source)
    mk = torch.zeros(ng, n_max, e_max, num_heads, dtype=dtype, device=device)
    mk = mk.index_put((eg, n_loc[heads], e_loc), mark)
    tl = torch.zeros(ng, e_max, e_max, num_heads, dtype=dtype, device=device)
    if schedule.num_line_edges:
        la, lb = schedule.line_index
        tl = tl.index_put((eg[lb], e_loc[lb], e_loc[la]), transition)
    sr, mk, tl = (x.permute(0, 3, 1, 2) for x in (sr, mk, tl))  # [G, H, ., .]
    eye = torch.eye(e_max, dtype=dtype, device=device)
    x = torch.linalg.solve_triangular(eye - tl, sr, upper=False, unitriangular=True)  # (I - Tl)^{-1} Sr
    return mk @ x


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
