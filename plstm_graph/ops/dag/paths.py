"""Path-list form of the pLSTM DAG operator: one product per line-graph path, for small graphs on the CPU.

SPEC section 2's parallel form, ``y_n = sum_u G[n, u] (q_n . k_u) v_u + direct_n (q_n . k_n) v_n``, with
``G[n, u]`` summed path by path instead of as a dense matrix: every line-graph path ``a_1 -> a_2 -> ... -> a_m``
(edges, ``head(a_i) == tail(a_{i+1})``, ``m >= 1``) from node ``u = tail(a_1)`` to node ``n = head(a_m)``
contributes

    w_p = source[a_1] * transition[(a_1, a_2)] * ... * transition[(a_{m-1}, a_m)] * mark[a_m]
    y_n += w_p * (q_n . k_u) * v_u

The paths depend on the graph only, so they are enumerated once per schedule (on the CPU, cached in
``schedule.cache``) as rows of indices into the stacked gates ``[source; transition; mark; 1]`` (padded with
the index of the constant ``1``). The operator is then a handful of gathers, one ``prod`` and one
``index_add``, whatever the depth of the DAG: on molecule batches (a few hundred short paths per batch of 32)
that is ~3x less CPU time than the ``parallel`` backend's level-by-level path sums and padded attention (FreeSolv
batches of 32: 1.3 ms against 3.9 ms forward + backward per call, ``benchmarks/molecule_ops.py optime``).
Gradients: autograd through those ops.

The number of paths can grow exponentially with the graph (a chain of diamonds doubles it at every diamond),
so it is counted first, by a cheap pass over the levels, and the tables are built only under a budget
(:func:`path_tables`); ``backend="auto"`` uses this backend only then.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ...graph.schedule import DAGSchedule

__all__ = ["plstm_dag_paths", "path_tables", "count_paths", "auto_takes_paths", "AUTO_PATHS_PER_EDGE", "MAX_PATHS"]

#: ``backend="auto"`` takes this backend while the schedule has at most ``AUTO_PATHS_PER_EDGE * E + 4096`` paths
AUTO_PATHS_PER_EDGE = 16
#: hard limit for ``backend="paths"`` (the index table has one row per path)
MAX_PATHS = 1 << 22


def count_paths(schedule: DAGSchedule) -> int:
    """Number of line-graph paths (of one or more edges) in the schedule's DAG, counted level by level without
    enumerating them: ``c[b] = 1 + sum over line edges (a, b) of c[a]``, summed over edges."""
    n = schedule.cache.get("num_paths")
    if n is None:
        la, lb = (t.cpu().numpy() for t in schedule.line_index)
        order = schedule.line_order_b.cpu().numpy()
        ptr = schedule.line_ptr_b
        c = np.ones(schedule.num_edges, dtype=np.float64)  # float: counts may overflow int64 on hostile DAGs
        for lvl in range(1, schedule.num_levels):  # every a of this group lies on an earlier level: final
            sel = order[ptr[lvl]:ptr[lvl + 1]]
            if len(sel):
                np.add.at(c, lb[sel], c[la[sel]])
        n = schedule.cache["num_paths"] = int(min(c.sum(), float(1 << 62)))
    return n


def auto_takes_paths(schedule: DAGSchedule) -> bool:
    """Whether ``backend="auto"`` runs this (CPU) schedule on this backend: at most
    ``AUTO_PATHS_PER_EDGE * E + 4096`` paths."""
    return count_paths(schedule) <= AUTO_PATHS_PER_EDGE * schedule.num_edges + 4096


def path_tables(schedule: DAGSchedule, max_paths: Optional[int] = None) -> Optional[dict]:
    """Index tables of every line-graph path, cached in ``schedule.cache["paths"]`` (built on the CPU, moved
    with the schedule). ``None`` if the DAG has more than ``max_paths`` paths (default :data:`MAX_PATHS`).

    Entries: ``factors [P, D]`` long, row ``p`` the indices of path ``p``'s gates in
    ``[source (E); transition (L); mark (E); 1]`` (``source[a_1]``, its transitions, ``mark[a_m]``, then the
    index ``2E + L`` of the constant 1); ``head [P]`` the node the path ends at (``n``), ``tail [P]`` the node
    it starts from (``u``).
    """
    limit = MAX_PATHS if max_paths is None else max_paths
    tables = schedule.cache.get("paths")
    if tables is not None:
        return tables
    total = count_paths(schedule)
    if total > limit:
        return None
    e_num, l_num = schedule.num_edges, schedule.num_line_edges
    tails, heads = (t.cpu().numpy() for t in schedule.edge_index)
    la, lb = (t.cpu().numpy() for t in schedule.line_index)
    by_a = np.argsort(la, kind="stable")  # line edges grouped by their first edge
    out_ptr = np.zeros(e_num + 1, dtype=np.int64)
    np.cumsum(np.bincount(la, minlength=e_num), out=out_ptr[1:])
    # paths of m edges, m = 1, 2, ...: their gate indices so far, first edge, last edge
    cur = np.arange(e_num, dtype=np.int64)[:, None]
    first = last = np.arange(e_num, dtype=np.int64)
    groups = []
    while len(last):
        groups.append((cur, first, last))
        deg = out_ptr[last + 1] - out_ptr[last]
        rep = np.repeat(np.arange(len(last)), deg)  # every path once per line edge leaving its last edge
        if not len(rep):
            break
        within = np.arange(len(rep)) - np.repeat(np.cumsum(deg) - deg, deg)
        lid = by_a[out_ptr[last][rep] + within]
        cur = np.concatenate([cur[rep], (e_num + lid)[:, None]], axis=1)
        first, last = first[rep], lb[lid]
    width = max(g[0].shape[1] for g in groups) + 1 if groups else 1
    one = 2 * e_num + l_num
    factors = np.full((total, width), one, dtype=np.int64)
    row = 0
    for gates, _, end in groups:
        m = gates.shape[1]
        factors[row:row + len(end), :m] = gates
        factors[row:row + len(end), m] = e_num + l_num + end  # the mark of the last edge
        row += len(end)
    first = np.concatenate([g[1] for g in groups]) if groups else np.zeros(0, dtype=np.int64)
    last = np.concatenate([g[2] for g in groups]) if groups else np.zeros(0, dtype=np.int64)
    dev = schedule.device
    tables = dict(factors=torch.from_numpy(factors).to(dev), head=torch.from_numpy(heads[last]).to(dev),
                  tail=torch.from_numpy(tails[first]).to(dev))
    schedule.cache["paths"] = tables
    return tables


def plstm_dag_paths(q, k, v, source, transition, mark, direct, schedule: DAGSchedule) -> torch.Tensor:
    """Path-list operator; same contract as :func:`plstm_graph.plstm_dag` (inputs of one dtype: the dispatcher
    upcasts half precision to float32). Raises ``ValueError`` when the DAG has more than :data:`MAX_PATHS`
    paths (use ``backend="levels"``).

    Shapes: q, k ``[N, H, K]``, v ``[N, H, V]``, source, mark ``[E, H]``, transition ``[L, H]``, direct
    ``[N, H]`` -> ``[N, H, V]``.

    Example (a diamond ``0 -> {1, 2} -> 3``: four one-edge paths and two two-edge paths):
        >>> import torch
        >>> from plstm_graph import compile_dag, plstm_dag
        >>> s = compile_dag(torch.tensor([[0, 0, 1, 2], [1, 2, 3, 3]]), num_nodes=4, mode="P")
        >>> count_paths(s), path_tables(s)["factors"].shape
        (6, torch.Size([6, 3]))
        >>> x = [torch.rand(4, 2, 3) for _ in range(3)]
        >>> gates = [torch.rand(4, 2), torch.rand(2, 2), torch.rand(4, 2), torch.rand(4, 2)]
        >>> y = plstm_dag_paths(*x, *gates, s)
        >>> torch.allclose(y, plstm_dag(*x, *gates, s, backend="reference"))
        True
    """
    tables = path_tables(schedule)
    if tables is None:
        raise ValueError(
            f"backend='paths' enumerates every line-graph path; this DAG has {count_paths(schedule):,} "
            f"(limit {MAX_PATHS:,}). Use backend='levels' or 'auto'."
        )
    y = (direct * (q * k).sum(-1))[..., None] * v
    if not tables["factors"].shape[0]:
        return y
    h = q.shape[1]
    gates = torch.cat([source, transition, mark, torch.ones(1, h, dtype=source.dtype, device=source.device)])
    weight = gates[tables["factors"]].prod(1)  # [P, H]: source * transitions * mark along each path
    head, tail = tables["head"], tables["tail"]
    score = (q[head] * k[tail]).sum(-1) * weight  # [P, H]
    return y.index_add(0, head, score[..., None] * v[tail])
