"""compile_dag: validate a DAG, orient undirected input, build the line graph and its level schedule.

Everything here is vectorised with numpy except the D-mode multitree rule, which is inherently
sequential in topological order and runs as one tight Python loop over nodes with in-degree >= 2 (nodes
with in-degree 0 or 1 have nothing to prune).

The D-mode rule (deterministic, maximal):
    Visit nodes ``u`` in topological order. The candidate parents of every edge leaving ``u`` are the
    edges entering ``u``; visit them in order of (level of their tail, edge id) and keep an incoming edge
    ``a`` unless the set of line-graph ancestors of ``a`` (``a`` included) intersects that of an already
    kept incoming edge of ``u``. Every edge leaving ``u`` receives the kept incoming edges.
Keeping a dropped pair would join two line nodes by a second path, so the result is a maximal multitree
(at most one directed path between any two line nodes). The intersection test uses the fact that two
ancestor sets in a multitree intersect iff they share a root (an edge leaving a source node), so each
node only carries a bitmask of its root ancestors (Python int, bits numbered per connected component).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from .schedule import DAGSchedule

__all__ = ["compile_dag", "orient_undirected"]

_ORIENTATIONS = ("index", "bfs")


# --------------------------------------------------------------------------- small numpy helpers
def _expand_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenate ``arange(s, s + c)`` for every (s, c), vectorised."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(counts) - counts  # start of each range in the output
    return np.repeat(starts - offsets, counts) + np.arange(total, dtype=np.int64)


def _csr(keys: np.ndarray, num: int):
    """Stable grouping of positions by key: (order, ptr) with group g at order[ptr[g]:ptr[g+1]]."""
    order = np.argsort(keys.astype(np.int32) if num < 1 << 31 else keys, kind="stable")
    ptr = np.zeros(num + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys, minlength=num), out=ptr[1:])
    return order, ptr


# --------------------------------------------------------------------------- input handling
def _as_edge_index(edge_index, num_nodes):
    """Accept a tensor / array edge_index, a PyG Data, or a networkx graph.

    Returns (edge_index int64 numpy [2, E], num_nodes, undirected_hint) where ``undirected_hint`` is True
    for a networkx ``Graph`` (undirected by type).
    """
    undirected = False
    try:  # PyG Data (duck-typed so torch_geometric stays optional)
        from torch_geometric.data import Data  # noqa: WPS433

        if isinstance(edge_index, Data):
            data = edge_index
            if data.edge_index is None:
                ei = np.zeros((2, 0), dtype=np.int64)
            else:
                ei = data.edge_index.detach().cpu().numpy()
            if num_nodes is None:
                num_nodes = data.num_nodes
            edge_index = ei
    except ImportError:  # pragma: no cover
        pass
    if type(edge_index).__module__.startswith("networkx"):
        import networkx as nx

        g = edge_index
        nodes = list(g.nodes())
        pos = {n: i for i, n in enumerate(nodes)}
        pairs = [(pos[a], pos[b]) for a, b in g.edges()]
        ei = np.array(pairs, dtype=np.int64).reshape(-1, 2).T
        if num_nodes is None:
            num_nodes = len(nodes)
        undirected = not g.is_directed()
        if isinstance(g, (nx.MultiGraph,)) and not g.is_directed():
            undirected = True
        edge_index = ei
    if isinstance(edge_index, torch.Tensor):
        if edge_index.is_floating_point() or edge_index.is_complex() or edge_index.dtype == torch.bool:
            raise ValueError(f"edge_index must hold integer node ids, got dtype {edge_index.dtype}")
        edge_index = edge_index.detach().cpu().numpy()
    ei = np.asarray(edge_index)
    if ei.size == 0:
        ei = ei.reshape(2, 0)
    if ei.dtype.kind not in "iu":
        raise ValueError(f"edge_index must hold integer node ids, got dtype {ei.dtype}")
    if ei.ndim != 2 or ei.shape[0] != 2:
        raise ValueError(f"edge_index must have shape [2, E], got {list(ei.shape)}")
    ei = ei.astype(np.int64, copy=False)
    if num_nodes is None:
        num_nodes = int(ei.max()) + 1 if ei.size else 0
    num_nodes = int(num_nodes)
    if num_nodes < 0:
        raise ValueError(f"num_nodes must be >= 0, got {num_nodes}")
    return ei, num_nodes, undirected


def _validate(ei: np.ndarray, num_nodes: int) -> None:
    if ei.size == 0:
        return
    if ei.min() < 0:
        col = int(np.flatnonzero((ei < 0).any(0))[0])
        raise ValueError(f"edge_index has a negative node id at column {col}: {ei[:, col].tolist()}")
    if ei.max() >= num_nodes:
        col = int(np.flatnonzero((ei >= num_nodes).any(0))[0])
        raise ValueError(
            f"edge_index refers to node {int(ei[:, col].max())} (column {col}) but num_nodes={num_nodes}; "
            f"node ids must lie in [0, {num_nodes})"
        )
    loops = np.flatnonzero(ei[0] == ei[1])
    if loops.size:
        raise ValueError(
            f"edge_index has {loops.size} self-loop(s), e.g. {int(ei[0, loops[0]])} -> {int(ei[0, loops[0]])} "
            f"(column {int(loops[0])}); a DAG has none. Remove them, e.g. with "
            f"torch_geometric.utils.remove_self_loops"
        )


def _reciprocal_pairs(ei: np.ndarray, num_nodes: int) -> np.ndarray:
    """Columns c whose reverse edge (w, u) is also present."""
    if ei.size == 0:
        return np.zeros(0, dtype=np.int64)
    n = max(num_nodes, 1)
    fwd = ei[0] * n + ei[1]
    bwd = ei[1] * n + ei[0]
    return np.flatnonzero(np.isin(bwd, fwd))


def orient_undirected(
    edge_index,
    num_nodes: int,
    orientation: Union[str, torch.Tensor, Sequence[float]] = "index",
    roots: Optional[Sequence[int]] = None,
):
    """Orient an undirected graph into a DAG by a node ranking: every edge points from the lower rank to
    the higher rank (ties broken by node id).

    Args:
        edge_index: ``[2, E]``; each undirected edge may appear once or in both directions; duplicates of
            an unordered pair collapse to one edge.
        orientation: ``"index"`` (rank = node id), ``"bfs"`` (rank = hop distance from ``roots``, default
            root node 0 of every connected component: the smallest id), or a ``[N]`` tensor of ranks.
        roots: start nodes for ``"bfs"``.

    Returns:
        ``(oriented_edge_index [2, E'] numpy int64, input_edge_ids [E'] numpy int64)`` where
        ``input_edge_ids[e]`` is the first column of the input holding that unordered pair.
    """
    ei = np.asarray(edge_index, dtype=np.int64)
    n = max(int(num_nodes), 1)
    if isinstance(orientation, str):
        if orientation == "index":
            rank = np.arange(num_nodes, dtype=np.float64)
        elif orientation == "bfs":
            rank = _bfs_rank(ei, num_nodes, roots)
        else:
            raise ValueError(f"orientation must be one of {_ORIENTATIONS} or a node ranking, got {orientation!r}")
    else:
        rank = np.asarray(
            orientation.detach().cpu().numpy() if isinstance(orientation, torch.Tensor) else orientation,
            dtype=np.float64,
        ).reshape(-1)
        if rank.shape[0] != num_nodes:
            raise ValueError(f"a node ranking must have one value per node ({num_nodes}), got {rank.shape[0]}")
        if not np.isfinite(rank).all():
            raise ValueError("a node ranking must be finite")
    if ei.size == 0:
        return ei.reshape(2, 0), np.zeros(0, dtype=np.int64)
    u, w = ei
    # key = (rank, id): "u before w" iff (rank[u], u) < (rank[w], w)
    u_first = (rank[u] < rank[w]) | ((rank[u] == rank[w]) & (u < w))
    tail = np.where(u_first, u, w)
    head = np.where(u_first, w, u)
    key = tail * n + head
    _, first = np.unique(key, return_index=True)
    first = np.sort(first)  # keep the user's column order
    return np.stack([tail[first], head[first]]), first.astype(np.int64)


def _bfs_rank(ei: np.ndarray, num_nodes: int, roots) -> np.ndarray:
    """Hop distance of every node from the nearest root (undirected), via one BFS from a virtual node."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components, shortest_path

    if num_nodes == 0:
        return np.zeros(0)
    und = sp.coo_matrix((np.ones(ei.shape[1]), (ei[0], ei[1])), shape=(num_nodes, num_nodes)).tocsr()
    if roots is None:
        _, comp = connected_components(und, directed=False)
        _, roots = np.unique(comp, return_index=True)  # the smallest id of every component
    roots = np.asarray([int(r) for r in roots], dtype=np.int64)
    bad = roots[(roots < 0) | (roots >= num_nodes)]
    if bad.size:
        raise ValueError(f"bfs root {int(bad[0])} is not a node id in [0, {num_nodes})")
    virt = num_nodes  # a virtual node joined to every root: one BFS gives the multi-source distance
    rows = np.concatenate([ei[0], ei[1], np.full(roots.size, virt)])
    cols = np.concatenate([ei[1], ei[0], roots])
    adj = sp.coo_matrix((np.ones(rows.size), (rows, cols)), shape=(num_nodes + 1, num_nodes + 1)).tocsr()
    dist = shortest_path(adj, unweighted=True, indices=virt, directed=True)[:num_nodes] - 1
    if np.isinf(dist).any():  # unreachable from the given roots: ranked after everything reachable
        dist[np.isinf(dist)] = dist[np.isfinite(dist)].max(initial=0) + 1
    return dist


# --------------------------------------------------------------------------- levels and cycles
def _levels_or_cycle(ei: np.ndarray, num_nodes: int, out_csr=None) -> np.ndarray:
    """Longest-path depth of every node (Kahn's algorithm, one numpy step per level).

    ``out_csr``: the edges grouped by tail (``_csr(tails)``), when the caller already has it.
    Raises ValueError naming a directed cycle when the graph has one.
    """
    tails, heads = ei
    indeg = np.bincount(heads, minlength=num_nodes).astype(np.int64)
    out_order, out_ptr = out_csr if out_csr is not None else _csr(tails, num_nodes)
    heads_by_tail = heads[out_order]
    level = np.full(num_nodes, -1, dtype=np.int64)
    frontier = np.flatnonzero(indeg == 0)
    lvl = 0
    while frontier.size:
        level[frontier] = lvl
        starts = out_ptr[frontier]
        idx = _expand_ranges(starts, out_ptr[frontier + 1] - starts)
        if idx.size == 0:
            break
        hs, cnt = np.unique(heads_by_tail[idx], return_counts=True)
        indeg[hs] -= cnt
        frontier = hs[indeg[hs] == 0]
        lvl += 1
    if (level < 0).any():
        raise ValueError(_describe_cycle(ei, level < 0))
    return level


def _describe_cycle(ei: np.ndarray, remaining: np.ndarray) -> str:
    tails, heads = ei
    inner = remaining[tails] & remaining[heads]
    pred = np.full(remaining.shape[0], -1, dtype=np.int64)
    pred[heads[inner]] = tails[inner]  # any remaining predecessor will do
    start = int(np.flatnonzero(remaining)[0])
    seen = {}
    node = start
    step = 0
    while node not in seen:
        seen[node] = step
        node = int(pred[node])
        step += 1
    cycle = [node]
    cur = int(pred[node])
    while cur != node:
        cycle.append(cur)
        cur = int(pred[cur])
    cycle.reverse()  # pred pointers walk backwards
    shown = cycle if len(cycle) <= 8 else cycle[:8]
    path = " -> ".join(str(c) for c in shown) + (" -> ..." if len(cycle) > 8 else f" -> {cycle[0]}")
    return (
        f"edge_index is not a DAG: it has a directed cycle through node {cycle[0]} ({path}; cycle length "
        f"{len(cycle)}, {int(remaining.sum())} nodes on or behind cycles). pLSTM needs an acyclic graph; "
        f"orient it with compile_dag(..., orientation='index' | 'bfs' | ranking) if it is undirected."
    )


# --------------------------------------------------------------------------- line graph
def _line_graph(ei: np.ndarray, num_nodes: int, out_csr, keep_in: Optional[np.ndarray] = None) -> np.ndarray:
    """All pairs (a, b) with head(a) == tail(b), restricted to incoming edges with keep_in[a].
    ``out_csr``: the edges grouped by tail, ``_csr(tails, num_nodes)``."""
    tails, heads = ei
    num_edges = tails.shape[0]
    out_order, out_ptr = out_csr
    a_ids = np.arange(num_edges, dtype=np.int64)
    if keep_in is not None:
        a_ids = a_ids[keep_in]
    h = heads[a_ids]
    starts = out_ptr[h]
    counts = out_ptr[h + 1] - starts
    b = out_order[_expand_ranges(starts, counts)]
    a = np.repeat(a_ids, counts)
    return np.stack([a, b]) if a.size else np.zeros((2, 0), dtype=np.int64)


def _multitree_keep(ei: np.ndarray, num_nodes: int, level: np.ndarray, comp: np.ndarray) -> np.ndarray:
    """Boolean [E]: incoming edges kept as line-graph parents of the edges leaving their head (D-mode)."""
    tails, heads = ei
    num_edges = tails.shape[0]
    keep = np.ones(num_edges, dtype=bool)
    if num_edges == 0:
        return keep
    indeg = np.bincount(heads, minlength=num_nodes)
    # Roots: edges leaving a source node. Each gets a bit, numbered within its component.
    is_root = indeg[tails] == 0
    root_ids = np.flatnonzero(is_root)
    root_comp = comp[tails[root_ids]]
    o = np.lexsort((root_ids, root_comp))
    root_ids, root_comp = root_ids[o], root_comp[o]
    bit = np.full(num_edges, -1, dtype=np.int64)
    bit[root_ids] = np.arange(root_ids.size) - np.searchsorted(root_comp, root_comp, side="left")
    # Only "merge" nodes (in-degree >= 2) can drop anything. Every other node passes its single incoming
    # edge's root set on unchanged, so resolve each node to a representative once, by pointer jumping:
    #   rep >= 0: the root set is that merge node's accumulated mask;  rep < 0: the single bit ~rep.
    single_in = np.full(num_nodes, -1, dtype=np.int64)
    one = np.flatnonzero(indeg[heads] == 1)
    single_in[heads[one]] = one
    rep = np.arange(num_nodes, dtype=np.int64)  # merge nodes (and sources, unused) represent themselves
    ptr = np.arange(num_nodes, dtype=np.int64)
    chain = np.flatnonzero(indeg == 1)
    a_of = single_in[chain]
    y_of = tails[a_of]
    from_source = indeg[y_of] == 0
    rep[chain[from_source]] = ~bit[a_of[from_source]]
    through = ~from_source & (indeg[y_of] == 1)
    rep[chain[~from_source & ~through]] = y_of[~from_source & ~through]  # tail is a merge node
    ptr[chain[through]] = y_of[through]
    pending = chain[through]
    while pending.size:  # pointer jumping: O(log chain length) vectorised rounds
        nxt = ptr[pending]
        done = ptr[nxt] == nxt
        rep[pending[done]] = rep[nxt[done]]
        ptr[pending[~done]] = ptr[nxt[~done]]
        pending = pending[~done]
    # in-edges of merge nodes, ordered by (head's level, head id, tail's level, edge id)
    merge_in = np.flatnonzero(indeg[heads] >= 2)
    if merge_in.size == 0:
        return keep
    o = np.lexsort((merge_in, level[tails[merge_in]], heads[merge_in], level[heads[merge_in]]))
    merge_in = merge_in[o]
    y = tails[merge_in]
    src = np.where(indeg[y] == 0, ~bit[merge_in], np.where(indeg[y] >= 2, y, rep[y]))
    # how often each merge node's mask is read, so it can be freed after its last use
    uses = np.bincount(src[src >= 0], minlength=num_nodes)
    hu = heads[merge_in]
    bounds = np.flatnonzero(np.diff(hu)) + 1
    starts = np.concatenate([[0], bounds]).tolist()
    ends = np.concatenate([bounds, [hu.size]]).tolist()
    heads_l = hu.tolist()
    src_l = src.tolist()
    uses_l = uses.tolist()
    masks = {}
    dropped = []
    for lo, hi in zip(starts, ends):
        acc = 0
        for j in range(lo, hi):
            s_ = src_l[j]
            if s_ < 0:
                m = 1 << (~s_)
            else:
                m = masks[s_]
                uses_l[s_] -= 1
                if uses_l[s_] == 0:
                    del masks[s_]
            if m & acc:
                dropped.append(j)
            else:
                acc |= m
        u = heads_l[lo]
        if uses_l[u]:
            masks[u] = acc
    if dropped:
        keep[merge_in[np.asarray(dropped, dtype=np.int64)]] = False
    return keep


def _components(ei: np.ndarray, num_nodes: int):
    if num_nodes == 0:
        return np.zeros(0, dtype=np.int64), 0
    if ei.shape[1] == 0:
        return np.arange(num_nodes, dtype=np.int64), num_nodes
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    adj = sp.coo_matrix((np.ones(ei.shape[1], dtype=np.int8), (ei[0], ei[1])), shape=(num_nodes, num_nodes))
    ncomp, comp = connected_components(adj.tocsr(), directed=True, connection="weak")
    return comp.astype(np.int64), int(ncomp)


# --------------------------------------------------------------------------- public entry point
def compile_dag(
    edge_index,
    num_nodes: Optional[int] = None,
    mode: str = "P",
    *,
    orientation: Union[None, str, torch.Tensor, Sequence[float]] = None,
    roots: Optional[Sequence[int]] = None,
    device=None,
    _graph_id: Optional[torch.Tensor] = None,
    _num_graphs: Optional[int] = None,
) -> DAGSchedule:
    """Validate a DAG and compile its line graph and topological level schedule.

    Args:
        edge_index: ``LongTensor[2, E]`` (row 0 tails, row 1 heads), a numpy array, a PyG ``Data`` or a
            networkx graph (nodes renumbered in ``G.nodes()`` order).
        num_nodes: ``N``; inferred from ``edge_index`` (or the Data / graph) when omitted.
        mode: ``"P"``: every pair ``(a, b)`` with ``head(a) == tail(b)`` is a line edge. ``"D"``: the
            deterministic maximal multitree subset described in the module docstring.
        orientation: ``None`` (default) for directed input, whose directions are kept. For undirected input
            (both directions present, PyG's convention, or a networkx ``Graph``) choose a policy:
            ``"index"`` (low id -> high id), ``"bfs"`` (by hop distance from ``roots``; ties by id) or a
            ``[N]`` node ranking (low rank -> high rank; ties by id). Each unordered pair becomes one edge;
            ``schedule.input_edge_ids`` maps edges back to input columns.
        roots: start nodes for ``orientation="bfs"`` (default: the smallest id of each component).
        device: where the schedule's tensors live (default CPU).

    Returns:
        :class:`DAGSchedule` with ``line_index [2, L]``, ``node_level [N]`` and the level plans.

    Raises:
        ValueError: a directed cycle (naming a node on it), self-loops, out-of-range or negative ids, a
            bad shape or dtype, or an ``edge_index`` holding both directions of its edges without an
            ``orientation``.

    Example:
        >>> import torch
        >>> from plstm_graph import compile_dag
        >>> ei = torch.tensor([[0, 0, 1, 2], [1, 2, 3, 3]])           # a diamond 0 -> {1, 2} -> 3
        >>> s = compile_dag(ei, num_nodes=4, mode="P")
        >>> s.line_index.tolist()
        [[0, 1], [2, 3]]
        >>> s.node_level.tolist()
        [0, 1, 1, 2]
    """
    if mode not in ("P", "D"):
        raise ValueError(f"mode must be 'P' (propagation) or 'D' (diffusion/multitree), got {mode!r}")
    ei, num_nodes, undirected_type = _as_edge_index(edge_index, num_nodes)
    _validate(ei, num_nodes)
    input_edge_ids = None
    if orientation is not None:
        ei, input_edge_ids = orient_undirected(ei, num_nodes, orientation, roots)
    elif undirected_type:
        raise ValueError(
            "got an undirected networkx graph; choose how to orient it with "
            "compile_dag(G, orientation='index' | 'bfs' | <node ranking>)"
        )
    out_csr = _csr(ei[0], num_nodes)  # shared by the level sweep and the line graph
    try:
        level = _levels_or_cycle(ei, num_nodes, out_csr)
    except ValueError:
        recip = _reciprocal_pairs(ei, num_nodes)  # only looked for on failure: it costs a hash of all edges
        if recip.size and orientation is None:
            c = int(recip[0])
            u, w = int(ei[0, c]), int(ei[1, c])
            allof = " (every edge, PyG's convention for undirected graphs)" if recip.size == ei.shape[1] else ""
            raise ValueError(
                f"edge_index holds both directions of {max(recip.size // 2, 1)} edge pair(s){allof}, e.g. "
                f"{u} -> {w} and {w} -> {u}; that is a cycle, not a DAG. If the graph is undirected, pass "
                f"orientation='index' (low id -> high id), orientation='bfs' (from roots) or a node ranking"
            ) from None
        raise
    if _graph_id is not None:
        comp = _graph_id.detach().cpu().numpy().astype(np.int64)
        ncomp = int(_num_graphs) if _num_graphs is not None else (int(comp.max()) + 1 if comp.size else 0)
    else:
        comp, ncomp = _components(ei, num_nodes)
    if mode == "P":
        line = _line_graph(ei, num_nodes, out_csr)
    else:
        keep = _multitree_keep(ei, num_nodes, level, comp)
        line = _line_graph(ei, num_nodes, out_csr, keep_in=keep)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    sched = DAGSchedule(
        edge_index=torch.from_numpy(np.ascontiguousarray(ei)).to(dev),
        line_index=torch.from_numpy(np.ascontiguousarray(line)).to(dev),
        node_level=torch.from_numpy(level).to(dev),
        num_nodes=num_nodes,
        mode=mode,
        graph_id=torch.from_numpy(comp).to(dev),
        num_graphs=ncomp,
        input_edge_ids=None if input_edge_ids is None else torch.from_numpy(input_edge_ids).to(dev),
    )
    return sched
