"""PyG batching of schedules: each graph carries its compiled schedule(s); a batch costs a concatenation.

``attach_schedules`` compiles a graph once (dataset time) and stores, for every requested schedule key
(``"P"``, ``"D"``, ``"P_rev"``, ``"D_rev"``), two attributes:

* ``<key>_line_index``: ``[2, L]``, offset by the graph's **number of edges** when batched;
* ``<key>_node_level``: ``[N]``, **not** offset, so level ``k`` of every graph runs in the same step.

:func:`schedule_from_batch` turns a batch (or a single graph) back into a :class:`DAGSchedule`: a stable
sort of the levels, no recompilation. The result equals compiling the disjoint union (tested).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch_geometric.data import Data

from .compile import compile_dag
from .schedule import DAGSchedule

__all__ = ["DAGData", "attach_schedules", "AttachSchedules", "schedule_from_batch", "schedule_key", "prepare_batch",
           "schedule_requirements"]


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


# ------------------------------------------------------------------------------------------ device transfer
ScheduleKeys = Union[None, "torch.nn.Module", Iterable[Union[str, Tuple[str, bool]]]]


def schedule_requirements(keys: ScheduleKeys, batch: Optional[Data] = None) -> Tuple[List[Tuple[str, bool]], Set[str]]:
    """The ``(mode, reverse)`` schedules and the operator backends that ``keys`` needs.

    ``keys``: a model (its :class:`~plstm_graph.nn.PLSTMGraphLayer` modules are read: ``mode``, ``reverse``,
    ``backend``), an iterable of ``(mode, reverse)`` pairs or schedule keys (``"P"``, ``"D_rev"``), or
    ``None``: every schedule ``batch`` carries, backend ``"auto"``.
    """
    out: List[Tuple[str, bool]] = []
    backends: Set[str] = set()
    if keys is None:
        for mode in ("P", "D"):
            for rev in (False, True):
                if batch is not None and getattr(batch, f"{schedule_key(mode, rev)}_line_index", None) is not None:
                    out.append((mode, rev))
        backends.add("auto")
    elif isinstance(keys, torch.nn.Module):
        from ..nn.graph import PLSTMGraphLayer

        for m in keys.modules():
            if isinstance(m, PLSTMGraphLayer):
                if (m.mode, bool(m.reverse)) not in out:
                    out.append((m.mode, bool(m.reverse)))
                backends.add(m.backend)
    else:
        for k in keys:
            pair = (k[:1], k.endswith("_rev")) if isinstance(k, str) else (str(k[0]), bool(k[1]))
            schedule_key(*pair)  # validates the mode
            if pair not in out:
                out.append(pair)
        backends.add("auto")
    return out, backends


def _wants_triton_plans(device: torch.device, backends: Set[str]) -> bool:
    if device.type == "cuda":
        wanted = bool(backends & {"auto", "triton"})
    elif device.type == "cpu":  # the CPU interpreter runs the triton backend only when asked for
        wanted = "triton" in backends
    else:
        return False
    if not wanted:
        return False
    from ..ops.dag import _triton_dag_available

    return _triton_dag_available()


_ALIGN = 64  # bytes; every packed tensor starts aligned (Triton specialises kernels on 16-byte alignment)


def _pack_host(tensors: Sequence[torch.Tensor], pin: bool = False):
    """The bytes of CPU ``tensors`` in ONE uint8 buffer (pinned with ``pin``), grouped by dtype, every tensor
    starting on a 64-byte boundary. Returns ``(buffer, groups, slots)``: ``groups`` per dtype ``(dtype, byte
    offset, numel)`` and ``slots[i] = (group, element offset in the group, shape, contiguous strides)`` of
    ``tensors[i]``: :func:`_slot_view` makes each tensor back from a copy of the buffer with one ``as_strided``
    of its group (:func:`_typed`)."""
    by_dtype: Dict[torch.dtype, List[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    pieces: List[torch.Tensor] = []
    groups, slots = [], [None] * len(tensors)
    off = 0
    pad = torch.zeros(_ALIGN, dtype=torch.uint8)
    for dt, idx in by_dtype.items():
        size = torch.empty(0, dtype=dt).element_size()
        start = off
        for i in idx:
            t = tensors[i].detach().contiguous()
            slots[i] = (len(groups), (off - start) // size, tuple(t.shape), t.stride())
            if t.numel():
                pieces.append(t.view(-1).view(torch.uint8))
                off += t.numel() * size
            if off % _ALIGN:  # _ALIGN is a multiple of every element size
                pieces.append(pad[:_ALIGN - off % _ALIGN])
                off += _ALIGN - off % _ALIGN
        groups.append((dt, start, (off - start) // size))
    buffer = torch.empty(off, dtype=torch.uint8, pin_memory=pin and off > 0)
    if pieces:
        torch.cat(pieces, out=buffer)
    return buffer, groups, slots


def _typed(buf: torch.Tensor, groups) -> List[torch.Tensor]:
    """Per group of :func:`_pack_host`, its bytes in ``buf`` (or a copy of it) viewed as the group's dtype."""
    out = []
    for dt, start, numel in groups:
        size = torch.empty(0, dtype=dt).element_size()
        out.append(buf[start: start + numel * size].view(dt))
    return out


def _slot_view(typed: List[torch.Tensor], slot) -> torch.Tensor:
    """The tensor of one :func:`_pack_host` slot, a view of its group in ``typed`` (:func:`_typed`)."""
    g, off, shape, strides = slot
    base = typed[g]
    return base.as_strided(shape, strides, base.storage_offset() + off)


def _pack_to(tensors: Sequence[torch.Tensor], device: torch.device, pin: bool) -> List[torch.Tensor]:
    """Move CPU tensors to ``device`` with ONE host-to-device copy: their bytes are packed into one (pinned)
    buffer (:func:`_pack_host`), copied asynchronously, and every result is a contiguous view of the device
    buffer."""
    host, groups, slots = _pack_host(tensors, pin=pin)
    typed = _typed(host.to(device, non_blocking=True), groups)
    return [_slot_view(typed, slot) for slot in slots]


def _wants_paths(device: torch.device, backends: Set[str]) -> Optional[str]:
    """Which path tables of the ``paths`` backend the step on ``device`` will read: ``"auto"`` (CPU, a layer
    on backend ``"auto"``: the tables of schedules under its path budget), ``"all"`` (a layer on ``"paths"``),
    or ``None``."""
    if "paths" in backends:
        return "all"
    return "auto" if device.type == "cpu" and "auto" in backends else None


def _build_schedules(batch: DAGData, needed, triton_plans: bool,
                     paths: Optional[str] = None) -> Dict[Tuple[str, bool], DAGSchedule]:
    """The ``needed`` ``(mode, reverse)`` schedules of a CPU ``batch`` (cached in it), each with its
    two-direction edge list (the blocks' local bond term reads it), with ``triton_plans`` its Triton plan, and
    with ``paths`` (:func:`_wants_paths`) the path tables of the ``paths`` backend: everything the step needs,
    built on the host (by :func:`prepare_batch`, or in a DataLoader worker by
    :class:`~plstm_graph.graph.collate.PrepareCollate`), never inside ``forward``."""
    from ..ops.dag.paths import auto_takes_paths, path_tables

    scheds: Dict[Tuple[str, bool], DAGSchedule] = {}
    for mode, rev in needed:
        scheds[(mode, rev)] = s = batch.schedule(mode, rev)
        s.both_directions()
        if paths == "all" or (paths == "auto" and auto_takes_paths(s)):
            path_tables(s)
    if triton_plans and scheds:
        from ..kernels import dag as _kdag

        for s in scheds.values():
            _kdag._plan(s, _kdag._choose_strategy(s))
    return scheds


def prepare_batch(batch, device, keys: ScheduleKeys = None, *, triton_plans: Optional[bool] = None,
                  pack: bool = True):
    """Move a PyG batch to ``device`` with its pLSTM schedules (and Triton index plans) built on the CPU first.

    Building a :class:`DAGSchedule` or a Triton plan from a batch already on the GPU copies index tensors to
    the host, one device synchronisation each (about a dozen per batch and layer kind). Here the schedules
    ``keys`` needs are built on the CPU batch, the Triton plans too when the device is CUDA (the ``auto`` and
    ``triton`` backends use them), and everything (batch, schedules, plans) goes to ``device`` in one
    packed, pinned, asynchronous copy (``pack=False``: one ``.to`` per tensor). The moved schedules land in
    the batch's schedule cache, so ``batch.schedule(mode, reverse)`` on the device, as every
    :class:`~plstm_graph.nn.PLSTMGraphLayer` calls it, returns them as they are: no host sync in the step.

    Args:
        batch: a (batched) :class:`DAGData` on the CPU, or a :class:`~plstm_graph.graph.collate.PackedBatch`
            (prepared in a DataLoader worker by :class:`~plstm_graph.graph.collate.PrepareCollate`: it is
            copied and unpacked, ``keys`` and ``triton_plans`` were decided there); anything else is moved
            with ``.to(device)``.
        device: target device.
        keys: the model (preferred: its layers say which ``(mode, reverse)`` schedules and backends it
            uses), an iterable of ``(mode, reverse)`` / ``"P_rev"`` keys, or ``None`` (every schedule the
            batch carries).
        triton_plans: build the Triton plans (default: when ``device`` is CUDA and triton is available and
            a layer uses backend ``"auto"`` / ``"triton"``; on the CPU only for ``backend="triton"``, the
            interpreter).

    Returns the batch on ``device`` (PyG's ``Data.to`` moves in place, so usually the same object).

    Example:
        >>> import torch
        >>> from torch_geometric.data import Data
        >>> from torch_geometric.loader import DataLoader
        >>> from plstm_graph.graph import attach_schedules, prepare_batch
        >>> from plstm_graph.nn import PLSTMGraphStack
        >>> g = attach_schedules(Data(edge_index=torch.tensor([[0, 1], [1, 2]]), num_nodes=3))
        >>> model = PLSTMGraphStack(dim=8, num_heads=2)
        >>> batch = prepare_batch(next(iter(DataLoader([g, g], batch_size=2))), "cpu", keys=model)
        >>> model(torch.randn(6, 8), batch).shape      # schedules come from the batch's cache
        torch.Size([6, 8])
    """
    device = torch.device(device)
    from .collate import PackedBatch

    if isinstance(batch, PackedBatch):  # prepared in a DataLoader worker (PrepareCollate): copy and unpack
        return batch.unpack(device)
    if not isinstance(batch, DAGData) or batch.edge_index is None or batch.edge_index.device.type != "cpu":
        return batch.to(device, non_blocking=True) if hasattr(batch, "to") else batch
    needed, backends = schedule_requirements(keys, batch)
    if triton_plans is None:
        triton_plans = _wants_triton_plans(device, backends)
    scheds = _build_schedules(batch, needed, triton_plans, _wants_paths(device, backends))
    if device == batch.edge_index.device:
        return batch
    return _move_prepared(batch, scheds, device, pack)


def _move_prepared(batch: DAGData, scheds: Dict[Tuple[str, bool], DAGSchedule], device: torch.device,
                   pack: bool = True) -> DAGData:
    """Move ``batch`` and its prepared CPU schedules to ``device``; the moved schedules go into the batch's
    schedule cache under the batch's new device. (Separate from :func:`prepare_batch` so that the tests can
    run the whole move, packing included, on a CPU-only machine.)"""
    if not pack:
        moved = batch.to(device, non_blocking=True)
        cache = moved.__dict__.setdefault("_schedule_cache", {})
        for (mode, rev), s in scheds.items():
            cache[(schedule_key(mode, rev), moved.edge_index.device)] = s.map_tensors(
                lambda t: t.to(device, non_blocking=True))
        return moved
    # one packed copy: batch tensors, then every schedule / plan tensor (shared ones once)
    unique: Dict[int, torch.Tensor] = {}
    stores = [(store, k, v) for store in batch.stores for k, v in store.items()
              if isinstance(v, torch.Tensor) and v.layout == torch.strided and not v.requires_grad]
    for _, _, v in stores:
        unique.setdefault(id(v), v)
    for s in scheds.values():
        for t in s.tensors():
            unique.setdefault(id(t), t)
    ids = [i for i, t in unique.items() if t.device.type == "cpu" and t.layout == torch.strided
           and not t.requires_grad]
    moved_t = dict(zip(ids, _pack_to([unique[i] for i in ids], device, pin=device.type == "cuda")))
    lookup = lambda t: moved_t[id(t)] if id(t) in moved_t else t.to(device, non_blocking=True)  # noqa: E731
    for store, k, v in stores:
        store[k] = lookup(v)
    moved = batch.to(device, non_blocking=True)  # anything left (a no-op for the moved tensors)
    cache = moved.__dict__.setdefault("_schedule_cache", {})
    for (mode, rev), s in scheds.items():
        cache[(schedule_key(mode, rev), moved.edge_index.device)] = s.map_tensors(lookup)
    return moved
