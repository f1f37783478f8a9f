"""The schedule record: everything an operator needs to run pLSTM on a DAG, computed once.

A :class:`DAGSchedule` is produced by :func:`plstm_graph.compile_dag` (or rebuilt from a PyG batch by
:func:`plstm_graph.graph.schedule_from_batch`) and is the only thing that travels from data to operator.
It is immutable; ``.to(device)`` returns a copy on another device.

Index conventions (SPEC section 1):

* ``edge_index[:, e] = (u, w)`` is the DAG edge ``e: u -> w`` (tail ``u``, head ``w``).
* ``line_index[:, l] = (a, b)`` is the line edge carrying the cell state of edge ``a`` into edge ``b``
  through the shared node ``head(a) == tail(b)``.
* ``node_level[n]`` is the length of the longest path ending at ``n``. Edge ``b`` runs at level
  ``node_level[tail(b)]``; every line edge ``(a, b)`` therefore goes from a lower level to a higher one,
  so all edges of one level can be updated together.

Derived "plan" arrays (sorted orders and level pointers) are built in the constructor, i.e. at
compile / collate time, never inside ``forward``. Level pointers are kept as Python tuples so that a GPU
backend can slice without a device synchronisation.

Offsets when graphs are batched as a disjoint union (PyG style): ``edge_index`` rows by the number of
nodes, ``line_index`` rows by the number of edges, ``node_level`` not at all (level ``k`` of every graph
runs together), ``graph_id`` by the number of graphs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Tuple

import numpy as np
import torch

__all__ = ["DAGSchedule"]


def _group_by_level(keys: np.ndarray, num_bins: int):
    """Stable order of positions grouped by (small, non-negative) integer key, and the group pointers."""
    if num_bins <= 1 << 16:  # numpy's stable sort is a linear-time radix sort for 16-bit keys
        keys = keys.astype(np.uint16 if num_bins > 1 << 8 else np.uint8)
    order = np.argsort(keys, kind="stable")
    ptr = np.zeros(num_bins + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys, minlength=num_bins), out=ptr[1:])
    return torch.from_numpy(order.astype(np.int64, copy=False)), tuple(ptr.tolist())


def _host_key(key) -> bool:
    return isinstance(key, str) and key.endswith("_cpu")


def _map_cache(obj: Any, fn):
    """``obj`` with ``fn`` applied to every tensor inside (dicts, lists, tuples); ``*_cpu`` dict keys kept."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: (v if _host_key(k) else _map_cache(v, fn)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (torch.Tensor, dict, list, tuple)) for v in obj):
        out = [_map_cache(v, fn) for v in obj]
        return out if isinstance(obj, list) else tuple(out)
    return obj


def _cache_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if not _host_key(k):
                yield from _cache_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _cache_tensors(v)


@dataclass(frozen=True, eq=False)
class DAGSchedule:
    """Compiled, immutable schedule of a DAG (or a disjoint union of DAGs).

    Attributes:
        edge_index: ``[2, E]`` long, the (oriented) DAG edges; row 0 tails, row 1 heads.
        line_index: ``[2, L]`` long, line edges ``(a, b)`` as edge ids.
        node_level: ``[N]`` long, longest-path depth of each node.
        num_nodes: ``N``.
        mode: ``"P"`` (every line edge) or ``"D"`` (line graph pruned to a multitree).
        reversed: whether this is the schedule of the reversed DAG of the one given by the user.
        graph_id: ``[N]`` long, which graph (weakly connected component, or batch member) each node is in.
        num_graphs: number of graphs in ``graph_id``.
        input_edge_ids: ``[E]`` long or ``None``; for oriented undirected input, the column of the user's
            ``edge_index`` each oriented edge came from (so edge features can be gathered).

    Derived (plan) attributes, built on construction:
        num_levels, edge_level ``[E]``, edge_order / edge_ptr (edges sorted by level),
        line_order_b / line_ptr_b (line edges grouped by the level of ``b``: the forward sweep),
        line_order_a / line_ptr_a (line edges grouped by the level of ``a``: the backward sweep),
        edge_graph ``[E]``.

    Example:
        >>> import torch, plstm_graph
        >>> s = plstm_graph.compile_dag(torch.tensor([[0, 1], [1, 2]]), num_nodes=3)
        >>> s.line_index.tolist(), s.num_levels
        ([[0], [1]], 3)
    """

    edge_index: torch.Tensor
    line_index: torch.Tensor
    node_level: torch.Tensor
    num_nodes: int
    mode: str = "P"
    reversed: bool = False
    graph_id: Optional[torch.Tensor] = None
    num_graphs: int = 1
    input_edge_ids: Optional[torch.Tensor] = None
    # plan, filled in __post_init__
    num_levels: int = field(init=False)
    edge_level: torch.Tensor = field(init=False)
    edge_order: torch.Tensor = field(init=False)
    edge_ptr: Tuple[int, ...] = field(init=False)
    line_order_b: torch.Tensor = field(init=False)
    line_ptr_b: Tuple[int, ...] = field(init=False)
    line_order_a: torch.Tensor = field(init=False)
    line_ptr_a: Tuple[int, ...] = field(init=False)
    edge_graph: torch.Tensor = field(init=False)
    # backend-specific derived data (e.g. the dense layout of the "parallel" backend), filled on first use
    cache: dict = field(init=False, repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "cache", {})
        device = self.edge_index.device
        n = int(self.num_nodes)
        set_(self, "num_nodes", n)
        if self.mode not in ("P", "D"):
            raise ValueError(f"mode must be 'P' or 'D', got {self.mode!r}")
        gid = self.graph_id
        if gid is None:
            gid = torch.zeros(n, dtype=torch.long, device=device)
            set_(self, "graph_id", gid)
        node_level_cpu = self.node_level.cpu()
        num_levels = int(node_level_cpu.max()) + 1 if n > 0 else 0
        set_(self, "num_levels", num_levels)
        tails = self.edge_index[0]
        edge_level = self.node_level[tails]
        set_(self, "edge_level", edge_level)
        set_(self, "edge_graph", gid[tails] if tails.numel() else torch.zeros(0, dtype=torch.long, device=device))
        # Plans are computed on the CPU; stable sorts keep edge-id order within a level (deterministic).
        el = edge_level.cpu().numpy()
        order, ptr = _group_by_level(el, num_levels)
        set_(self, "edge_order", order.to(device))
        set_(self, "edge_ptr", ptr)
        li = self.line_index.cpu().numpy()
        order_b, ptr_b = _group_by_level(el[li[1]], num_levels)
        order_a, ptr_a = _group_by_level(el[li[0]], num_levels)
        set_(self, "line_order_b", order_b.to(device))
        set_(self, "line_ptr_b", ptr_b)
        set_(self, "line_order_a", order_a.to(device))
        set_(self, "line_ptr_a", ptr_a)

    # ------------------------------------------------------------------ sizes
    @property
    def num_edges(self) -> int:
        return int(self.edge_index.size(1))

    @property
    def num_line_edges(self) -> int:
        return int(self.line_index.size(1))

    @property
    def device(self) -> torch.device:
        return self.edge_index.device

    def both_directions(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(src, dst)``, each ``[2E]``: every edge ``u -> w`` and then every reversed edge ``w -> u`` (for
        message passing over the undirected graph, e.g. :class:`~plstm_graph.nn.blocks.LocalBondMix`).

        Cached in ``cache`` (it moves with the schedule), so building it before the move
        (:func:`plstm_graph.graph.prepare_batch` does, on the CPU) costs the step nothing on the device.
        """
        pair = self.cache.get("both_directions")
        if pair is None:
            tails, heads = self.edge_index
            pair = self.cache["both_directions"] = (torch.cat([tails, heads]), torch.cat([heads, tails]))
        return pair

    # ------------------------------------------------------------------ helpers
    def to(self, device, non_blocking: bool = False) -> "DAGSchedule":
        """A copy of the record with every tensor on ``device``; plans are moved, not recomputed.

        The backend ``cache`` moves too (see :meth:`map_tensors`), so index plans built on the CPU (e.g. the
        Triton plans, by :func:`plstm_graph.graph.prepare_batch`) need no rebuilding, and no host sync, on
        the device.
        """
        device = torch.device(device)
        if device == self.device:
            return self
        return self.map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor :meth:`map_tensors` would map: the fields', then the ``cache``'s (``*_cpu`` excluded)."""
        for name in self.__dataclass_fields__:
            val = getattr(self, name)
            if name == "cache":
                yield from _cache_tensors(val)
            elif isinstance(val, torch.Tensor):
                yield val

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "DAGSchedule":
        """A copy with ``fn`` applied to every tensor field and every tensor of ``cache`` (recursively through
        dicts, lists and tuples). Cache entries whose key ends in ``_cpu`` are host-side data of a plan (e.g.
        level pointers read by the launch loop) and are kept as they are; ints, strings and tuples of ints
        are kept too. Used by :meth:`to` and by :func:`plstm_graph.graph.prepare_batch`."""
        new = object.__new__(DAGSchedule)
        for name in self.__dataclass_fields__:
            val = getattr(self, name)
            if name == "cache":
                val = _map_cache(val, fn)
            elif isinstance(val, torch.Tensor):
                val = fn(val)
            object.__setattr__(new, name, val)
        return new

    def reverse(self) -> "DAGSchedule":
        """The schedule of the reversed DAG (every edge flipped), same mode and edge ids.

        Equal to ``compile_dag(edge_index.flip(0), num_nodes, mode)``; in D-mode the greedy multitree is
        recomputed on the reversed DAG, not merely transposed.
        """
        from .compile import compile_dag

        rev = compile_dag(
            self.edge_index.flip(0), self.num_nodes, mode=self.mode, _graph_id=self.graph_id,
            _num_graphs=self.num_graphs,
        )
        object.__setattr__(rev, "reversed", not self.reversed)
        object.__setattr__(rev, "input_edge_ids", self.input_edge_ids)
        return rev

    def __repr__(self) -> str:
        return (
            f"DAGSchedule(mode={self.mode!r}, reversed={self.reversed}, num_nodes={self.num_nodes}, "
            f"num_edges={self.num_edges}, num_line_edges={self.num_line_edges}, "
            f"num_levels={self.num_levels}, num_graphs={self.num_graphs}, device={self.device})"
        )
