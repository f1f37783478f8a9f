"""Readable reference of the pLSTM DAG operator: one edge at a time, in topological order.

This is the oracle every other backend is tested against. It is plain autograd-differentiable PyTorch,
works in float64, and mirrors SPEC section 2 line by line:

    C_b = source[b] * (k_u outer v_u) + sum_{(a, b)} transition[(a, b)] * C_a        for b = (u -> w)
    y_n = sum_{a = (x -> n)} mark[a] * (q_n^T C_a) + direct[n] * (q_n . k_n) * v_n

It is slow (a Python loop over edges) and meant for tests and small graphs only.
"""
from __future__ import annotations

import torch

from ...graph.schedule import DAGSchedule

__all__ = ["plstm_dag_reference"]


def plstm_dag_reference(q, k, v, source, transition, mark, direct, schedule: DAGSchedule) -> torch.Tensor:
    """Shapes: q, k ``[N, H, K]``; v ``[N, H, V]``; source, mark ``[E, H]``; transition ``[L, H]``;
    direct ``[N, H]``; returns ``[N, H, V]`` in the input dtype (computed in float32 for half inputs)."""
    out_dtype = v.dtype
    acc = torch.promote_types(v.dtype, torch.float32)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    source, transition, mark, direct = (t.to(acc) for t in (source, transition, mark, direct))
    tails, heads = schedule.edge_index.tolist() if schedule.num_edges else ([], [])
    line_a, line_b = schedule.line_index.tolist() if schedule.num_line_edges else ([], [])
    incoming_lines = [[] for _ in range(schedule.num_edges)]  # line edges (l, a) entering edge b
    for l, (a, b) in enumerate(zip(line_a, line_b)):
        incoming_lines[b].append((l, a))
    # topological order of edges: by the level of their tail (stable in edge id)
    order = schedule.edge_order.tolist()
    states = [None] * schedule.num_edges
    for b in order:
        u = tails[b]
        c = source[b, :, None, None] * (k[u, :, :, None] * v[u, :, None, :])  # [H, K, V]
        for l, a in incoming_lines[b]:
            c = c + transition[l, :, None, None] * states[a]
        states[b] = c
    y = direct[:, :, None] * (q * k).sum(-1, keepdim=True) * v  # [N, H, V]
    contributions = [[] for _ in range(schedule.num_nodes)]
    for a in range(schedule.num_edges):
        n = heads[a]
        contributions[n].append(mark[a, :, None] * torch.einsum("hk,hkv->hv", q[n], states[a]))
    rows = [y[n] + sum(contributions[n]) if contributions[n] else y[n] for n in range(schedule.num_nodes)]
    y = torch.stack(rows) if rows else y
    return y.to(out_dtype)
