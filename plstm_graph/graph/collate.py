"""Batches prepared in DataLoader workers: collation, schedules, Triton plans and packing off the main process.

:func:`~plstm_graph.graph.prepare_batch` builds a batch's schedules and Triton plans on the CPU and moves
everything to the device in one packed copy; in the main process that is ~5 ms per molecule batch that the
training step waits for. :class:`PrepareCollate` does the CPU part (PyG collation, the schedules the model
needs, their plans, and the packing) inside the loader's workers, and returns a :class:`PackedBatch`: ONE
``uint8`` buffer holding every tensor of the batch, its schedules and plans, plus a tensor-free pickled
skeleton. A worker's result crosses into the main process as that one shared-memory buffer (a PyG batch
sent as it is costs one file-descriptor transfer per tensor, ~100 for a prepared molecule batch); the main
process only copies the buffer to the device and rebuilds views of it (:meth:`PackedBatch.unpack`, called
by ``prepare_batch``).

Nothing here touches CUDA: whether plans are built is decided when the collate function is made (in the
main process) and the workers only index tensors on the CPU, so worker processes never initialise CUDA.
"""
from __future__ import annotations

import io
import pickle
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .batching import (ScheduleKeys, _build_schedules, _pack_host, _slot_view, _typed, _wants_paths,
                       _wants_triton_plans, schedule_requirements)

__all__ = ["PackedBatch", "PrepareCollate"]


def _is_host_key(key) -> bool:
    return isinstance(key, str) and key.endswith("_cpu")


class _Pickler(pickle.Pickler):
    """Pickles the skeleton: every tensor becomes a persistent id ``(slot, on_device)`` (no tensor data)."""

    def __init__(self, file, slots: Dict[int, int], device_ids: set, tensors: List[torch.Tensor]):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.slots, self.device_ids, self.tensors = slots, device_ids, tensors

    def persistent_id(self, obj):
        if not isinstance(obj, torch.Tensor):
            return None
        slot = self.slots.get(id(obj))
        if slot is None:
            slot = self.slots[id(obj)] = len(self.tensors)
            self.tensors.append(obj)
        return slot, id(obj) in self.device_ids


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, view):
        super().__init__(file)
        self.view = view

    def persistent_load(self, pid):
        return self.view(*pid)


def _host_tensors_apart(obj, device_ids: set):
    """``obj`` (a schedule cache) with every ``*_cpu`` tensor that is also device-bound replaced by a clone, so
    that one tensor object never has to be both a device view and a host view after unpacking."""
    if isinstance(obj, dict):
        return {k: (v.clone() if _is_host_key(k) and isinstance(v, torch.Tensor) and id(v) in device_ids
                    else _host_tensors_apart(v, device_ids)) for k, v in obj.items()}
    return obj


class PackedBatch:
    """A collated (and prepared) PyG batch as one byte buffer and a tensor-free pickled skeleton.

    Made by :meth:`pack` (in a DataLoader worker, by :class:`PrepareCollate`); :meth:`unpack` (or
    :func:`~plstm_graph.graph.prepare_batch`) gives the batch back on a device, its schedules and plans in
    the batch's schedule cache, exactly as ``prepare_batch`` on the unpacked CPU batch would. Tensors that
    ``prepare_batch`` moves (the batch's attributes, the schedules' tensors and their plans) become views of
    one device copy of the buffer; host-side data (PyG's slice bookkeeping, the plans' ``*_cpu`` entries)
    become views of the host buffer.

    Attributes:
        buffer: ``[nbytes]`` uint8 on the CPU (pinned after :meth:`pin_memory`).
        skeleton: the pickled batch with every tensor replaced by a slot number.
        groups: per dtype, ``(dtype, byte offset, numel)`` (every tensor starts on a 64-byte boundary).
        slots: per tensor slot, ``(group, element offset in the group, shape, strides)``: :meth:`unpack` makes
            each tensor with one ``as_strided`` of its group's part of the buffer.
    """

    def __init__(self, buffer: torch.Tensor, skeleton: bytes, groups: list, slots: list):
        self.buffer, self.skeleton, self.groups, self.slots = buffer, skeleton, groups, slots

    @classmethod
    def pack(cls, batch, schedules: Sequence = ()) -> "PackedBatch":
        """Pack ``batch`` (a CPU PyG batch whose schedule cache holds ``schedules``, e.g. after
        ``batch.schedule(mode, reverse)``) into one buffer."""
        device_ids = {id(v) for store in batch.stores for v in store.values() if isinstance(v, torch.Tensor)}
        for s in schedules:
            for t in s.tensors():
                device_ids.add(id(t))
        for s in schedules:
            object.__setattr__(s, "cache", _host_tensors_apart(s.cache, device_ids))
        seen: Dict[int, int] = {}  # id(tensor) -> its slot
        tensors: List[torch.Tensor] = []
        out = io.BytesIO()
        _Pickler(out, seen, device_ids, tensors).dump(batch)
        for t in tensors:
            if t.device.type != "cpu" or t.layout != torch.strided:
                raise ValueError("PackedBatch.pack takes a batch whose tensors are all dense and on the CPU")
        buffer, groups, slots = _pack_host(tensors)
        return cls(buffer, out.getvalue(), groups, slots)

    def pin_memory(self, device=None) -> "PackedBatch":
        """A copy whose buffer is in pinned memory (``DataLoader(pin_memory=True)`` calls this)."""
        if self.buffer.is_pinned():
            return self
        return PackedBatch(self.buffer.pin_memory(), self.skeleton, self.groups, self.slots)

    def unpack(self, device="cpu"):
        """The batch on ``device``, with its prepared schedules (and plans) in its schedule cache; one
        asynchronous host-to-device copy (from pinned memory if :meth:`pin_memory` ran)."""
        device = torch.device(device)
        host_buf = self.buffer
        dev_buf = host_buf if device.type == "cpu" else host_buf.to(device, non_blocking=True)
        host = _typed(host_buf, self.groups)
        dev = host if dev_buf is host_buf else _typed(dev_buf, self.groups)
        made: Dict[Tuple[int, bool], torch.Tensor] = {}

        def view(slot: int, on_device: bool) -> torch.Tensor:
            t = made.get((slot, on_device))
            if t is None:
                t = made[(slot, on_device)] = _slot_view(dev if on_device else host, self.slots[slot])
            return t

        batch = _Unpickler(io.BytesIO(self.skeleton), view).load()
        cache = batch.__dict__.get("_schedule_cache")
        if cache:  # keyed by device: the schedules now live on the buffer's device
            batch.__dict__["_schedule_cache"] = {(key, dev_buf.device): s for (key, _), s in cache.items()}
        return batch

    def __repr__(self) -> str:
        return f"PackedBatch({self.buffer.numel()} bytes, {len(self.slots)} tensors)"


class PrepareCollate:
    """``collate_fn`` for a ``torch.utils.data.DataLoader`` over :class:`~plstm_graph.graph.DAGData` graphs:
    PyG collation, then the schedules ``keys`` needs and (for a CUDA ``device``) their Triton plans, packed
    into a :class:`PackedBatch`. With ``num_workers > 0`` all of it runs in the workers; hand the result to
    :func:`~plstm_graph.graph.prepare_batch` (or :meth:`PackedBatch.unpack`) in the training step.

    Args:
        dataset: the loader's dataset (PyG's ``Collater`` reads its first element's type).
        keys: as :func:`~plstm_graph.graph.prepare_batch`'s ``keys`` (the model, preferred; ``None``: every
            schedule each batch carries); ``()`` for none (e.g. a message-passing baseline: the batch is only
            packed).
        device: where the batches will run (decides whether Triton plans are built; nothing is moved here).
        triton_plans: build the plans (default: as ``prepare_batch`` decides for ``device``).

    Resolved in the constructor (the main process): which schedules, and whether plans are built; the
    instance holds plain data only, so it pickles into spawned workers, and workers never query CUDA.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader
        >>> from torch_geometric.data import Data
        >>> from plstm_graph.graph import attach_schedules, prepare_batch
        >>> from plstm_graph.graph.collate import PrepareCollate
        >>> g = attach_schedules(Data(edge_index=torch.tensor([[0, 1], [1, 2]]), num_nodes=3))
        >>> loader = DataLoader([g, g], batch_size=2, collate_fn=PrepareCollate([g, g], keys=["P"]))
        >>> batch = prepare_batch(next(iter(loader)), "cpu")
        >>> batch.schedule("P").line_index.tolist()
        [[0, 2], [1, 3]]
    """

    def __init__(self, dataset, keys: ScheduleKeys = (), device="cpu", *, triton_plans: Optional[bool] = None,
                 follow_batch=None, exclude_keys=None):
        from torch_geometric.loader.dataloader import Collater

        self.collater = Collater(dataset, follow_batch, exclude_keys)
        needed, backends = schedule_requirements(keys) if keys is not None else (None, {"auto"})
        self.needed = None if needed is None else [(str(m), bool(r)) for m, r in needed]
        if triton_plans is None:
            triton_plans = self.needed != [] and _wants_triton_plans(torch.device(device), backends)
        self.triton_plans = bool(triton_plans)
        self.paths = _wants_paths(torch.device(device), backends) if self.needed != [] else None

    def __call__(self, data_list) -> PackedBatch:
        batch = self.collater(data_list)
        needed = self.needed if self.needed is not None else schedule_requirements(None, batch)[0]
        scheds = _build_schedules(batch, needed, self.triton_plans, self.paths)
        return PackedBatch.pack(batch, list(scheds.values()))
