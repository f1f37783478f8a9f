"""PyG batching of schedules: each graph carries its compiled schedule(s); a batch costs a concatenation.

``attach_schedules`` compiles a graph once (dataset time) and stores, for every requested schedule key
(``"P"``, ``"D"``, ``"P_rev"``, ``"D_rev"``), two attributes:

* ``<key>_line_index``: ``[2, L]``, offset by the graph's **number of edges** when batched;
* ``<key>_node_level``: ``[N]``, **not** offset, so level ``k`` of every graph runs in the same step.

:func:`schedule_from_batch` turns a batch (or a single graph) back into a :class:`DAGSchedule`: a stable
sort of the levels, no recompilation. The result equals compiling the disjoint union (tested).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch
from torch_geometric.data import Data

from .compile import compile_dag
from .schedule import DAGSchedule

__all__ = ["DAGData", "attach_schedules", "AttachSchedules", "schedule_from_batch", "schedule_key"]


def schedule_key(mode: str, reverse: bool = False) -> str:
    if mode not in ("P", "D"):
        raise ValueError(f"mode must be 'P' or 'D', got {mode!r}")
    return f"{mode}_rev" if reverse else mode


class DAGData(Data):
    """A PyG ``Data`` whose ``*_line_index`` / ``*_node_level`` attributes batch as schedules.

    ``DAGData.schedule(mode, reverse)`` (also on a batch) returns the cached :class:`DAGSchedule`.
    """

    def __inc__(self, key, value, *args, **kwargs):
        if key.endswith("line_index"):
            return self.edge_index.size(1) if self.edge_index is not None else 0
        if key.endswith("node_level"):
            return 0
        return super().__inc__(key, value, *args, **kwargs)

    def __cat_dim__(self, key, value, *args, **kwargs):
        if key.endswith("line_index"):
            return -1
        if key.endswith("node_level"):
            return 0
        return super().__cat_dim__(key, value, *args, **kwargs)

    def schedule(self, mode: str = "P", reverse: bool = False) -> DAGSchedule:
        """The schedule of this graph / batch for ``mode`` (reversed DAG if ``reverse``), cached."""
        cache = self.__dict__.setdefault("_schedule_cache", {})
        key = (schedule_key(mode, reverse), self.edge_index.device if self.edge_index is not None else None)
        if key not in cache:
            cache[key] = schedule_from_batch(self, mode, reverse)
        return cache[key]


def attach_schedules(
    data: Data,
    modes: Iterable[str] = ("P", "D"),
    reverse: bool = True,
    orientation: Union[None, str, torch.Tensor, Sequence[float]] = None,
    roots: Optional[Sequence[int]] = None,
) -> DAGData:
    """Compile ``data``'s DAG for every mode (and its reverse) and return a :class:`DAGData`.

    With ``orientation`` set, undirected input is oriented first and ``data.edge_index`` is replaced by
    the DAG's edges; every per-edge attribute (``edge_attr`` and any ``[E, ...]`` tensor) follows the
    kept columns, so no edge feature is silently misaligned.

    Example:
        >>> import torch
        >>> from torch_geometric.data import Data
        >>> from torch_geometric.loader import DataLoader
        >>> from plstm_graph.graph import attach_schedules
        >>> g = attach_schedules(Data(edge_index=torch.tensor([[0, 1], [1, 2]]), num_nodes=3))
        >>> batch = next(iter(DataLoader([g, g], batch_size=2)))
        >>> batch.schedule("P").line_index.tolist()
        [[0, 2], [1, 3]]
    """
    out = DAGData(**{k: v for k, v in data.items()})
    if out.edge_index is None:
        out.edge_index = torch.zeros(2, 0, dtype=torch.long)
    num_nodes = data.num_nodes
    num_edges_in = out.edge_index.size(1)
    first = None
    for mode in modes:
        sched = compile_dag(out.edge_index, num_nodes, mode=mode, orientation=orientation, roots=roots)
        if first is None:
            first = sched
        for rev in ([False, True] if reverse else [False]):
            s = sched.reverse() if rev else sched
            key = schedule_key(mode, rev)
            out[f"{key}_line_index"] = s.line_index
            out[f"{key}_node_level"] = s.node_level
    if first is not None and first.input_edge_ids is not None:
        keep = first.input_edge_ids
        for k, v in list(out.items()):
            if k == "edge_index" or k.endswith("line_index"):
                continue
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.size(0) == num_edges_in and k.startswith("edge"):
                out[k] = v[keep]
        out.edge_index = first.edge_index
    out.num_nodes = num_nodes
    return out


class AttachSchedules:
    """Transform form of :func:`attach_schedules` (for ``pre_transform=`` / ``transform=``)."""

    def __init__(self, modes=("P", "D"), reverse=True, orientation=None, roots=None):
        self.modes, self.reverse, self.orientation, self.roots = tuple(modes), reverse, orientation, roots

    def __call__(self, data: Data) -> DAGData:
        return attach_schedules(data, self.modes, self.reverse, self.orientation, self.roots)

    def __repr__(self) -> str:
        return f"AttachSchedules(modes={self.modes}, reverse={self.reverse}, orientation={self.orientation!r})"


def schedule_from_batch(batch: Data, mode: str = "P", reverse: bool = False) -> DAGSchedule:
    """Build the :class:`DAGSchedule` of a (batched) :class:`DAGData` without recompiling."""
    key = schedule_key(mode, reverse)
    li = getattr(batch, f"{key}_line_index", None)
    nl = getattr(batch, f"{key}_node_level", None)
    if li is None or nl is None:
        raise ValueError(
            f"this graph carries no '{key}' schedule; build it with attach_schedules(data, modes=[{mode!r}]"
            f"{', reverse=True' if reverse else ''}) or the AttachSchedules transform"
        )
    ei = batch.edge_index.flip(0) if reverse else batch.edge_index
    gid = getattr(batch, "batch", None)
    num_graphs = int(getattr(batch, "num_graphs", 1)) if gid is not None else 1
    return DAGSchedule(
        edge_index=ei,
        line_index=li,
        node_level=nl,
        num_nodes=batch.num_nodes,
        mode=mode,
        reversed=reverse,
        graph_id=gid,
        num_graphs=num_graphs,
    )
