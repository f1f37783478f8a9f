"""The pLSTM operator on a DAG: public function, backend choice, input checks.

Backends (``backend=``):

* ``"reference"``: :mod:`.reference`, one edge at a time; the oracle of the tests.
* ``"levels"``: :mod:`.levels`, one batched step per topological level, hand-written backward.
* ``"parallel"``: :mod:`.parallel`, dense per-graph path-sum matrices; for small graphs.
* ``"paths"``: :mod:`.paths`, one gate product per line-graph path; for graphs with few paths (molecules).
* ``"triton"``: GPU kernels from :mod:`plstm_graph.kernels` (CUDA, or CPU under ``TRITON_INTERPRET=1``).
* ``"auto"`` (default): ``"triton"`` on CUDA when available; on the CPU ``"paths"`` when the DAG has at most
  ``AUTO_PATHS_PER_EDGE * E + 4096`` line-graph paths (counted once per schedule, without enumerating them);
  else ``"parallel"`` when every graph of the batch has at most ``AUTO_PARALLEL_MAX_NODES`` nodes; else
  ``"levels"``.
"""
from __future__ import annotations

import os
from typing import List

import torch

from ...graph.schedule import DAGSchedule
from .levels import plstm_dag_levels
from .parallel import plstm_dag_parallel
from .paths import AUTO_PATHS_PER_EDGE, auto_takes_paths, plstm_dag_paths
from .reference import plstm_dag_reference

__all__ = ["plstm_dag", "dag_backends", "plstm_dag_reference", "plstm_dag_levels", "plstm_dag_parallel",
           "plstm_dag_paths"]

_BACKENDS = ("reference", "levels", "parallel", "paths", "triton")
AUTO_PARALLEL_MAX_NODES = 128


def _auto_takes_triton(q: torch.Tensor) -> bool:
    """Whether ``backend="auto"`` runs on the Triton kernels for tensors like ``q``: CUDA with triton."""
    return q.is_cuda and _triton_dag_available()


def _auto_backend(q: torch.Tensor, schedule: DAGSchedule) -> str:
    if _auto_takes_triton(q):
        return "triton"
    if not q.is_cuda and auto_takes_paths(schedule):
        return "paths"
    sizes = schedule.cache.get("graph_sizes_max")
    if sizes is None:
        counts = torch.bincount(schedule.graph_id, minlength=1) if schedule.num_nodes else torch.zeros(1)
        sizes = int(counts.max())
        schedule.cache["graph_sizes_max"] = sizes
    return "parallel" if sizes <= AUTO_PARALLEL_MAX_NODES else "levels"


def _triton_dag_available() -> bool:
    try:
        from ...kernels import dag as _kdag  # noqa: F401  (lazy: triton imported only here)
    except ImportError:
        return False
    return _kdag.available()


def dag_backends() -> List[str]:
    """Backends of :func:`plstm_dag` usable here, e.g. ``['reference', 'levels', 'parallel', 'paths']``."""
    out = ["reference", "levels", "parallel", "paths"]
    if _triton_dag_available():
        out.append("triton")
    return out


def _check(q, k, v, source, transition, mark, direct, schedule: DAGSchedule) -> None:
    if not isinstance(schedule, DAGSchedule):
        raise TypeError(
            f"schedule must be a DAGSchedule from plstm_graph.compile_dag, got {type(schedule).__name__}"
        )
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k, v must be [N, H, K], [N, H, K], [N, H, V]; got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}"
        )
    n, h, dk = q.shape
    expect = {
        "q": (q, (schedule.num_nodes, h, dk)),
        "k": (k, (schedule.num_nodes, h, dk)),
        "v": (v, (schedule.num_nodes, h, v.shape[2])),
        "source": (source, (schedule.num_edges, h)),
        "transition": (transition, (schedule.num_line_edges, h)),
        "mark": (mark, (schedule.num_edges, h)),
        "direct": (direct, (schedule.num_nodes, h)),
    }
    for name, (t, shape) in expect.items():
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{name} has shape {list(t.shape)}, expected {list(shape)} "
                f"(N={schedule.num_nodes} nodes, E={schedule.num_edges} edges, L={schedule.num_line_edges} "
                f"line edges, H={h} heads)"
            )
        if t.device != schedule.device:
            raise ValueError(
                f"{name} is on {t.device} but the schedule is on {schedule.device}; use schedule.to(device)"
            )


def plstm_dag(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    source: torch.Tensor,
    transition: torch.Tensor,
    mark: torch.Tensor,
    direct: torch.Tensor,
    schedule: DAGSchedule,
    backend: str = "auto",
    recompute: bool = False,
) -> torch.Tensor:
    """pLSTM on a DAG (SPEC section 2). Cell states live on edges; no scaling inside (scale ``q`` first).

    .. math::
        C_b = s_b\\,(k_u \\otimes v_u) + \\sum_{(a,b)} T_{ab} C_a, \\qquad
        y_n = \\sum_{a \\to n} m_a\\, q_n^\\top C_a + d_n (q_n\\cdot k_n) v_n

    Shapes:
        q, k: ``[N, H, K]``; v: ``[N, H, V]``; source, mark: ``[E, H]``; transition: ``[L, H]``
        (one value per line edge, in ``schedule.line_index`` order); direct: ``[N, H]``; returns
        ``y: [N, H, V]`` in ``v``'s dtype. Half-precision inputs are computed with float32 states.

    Args:
        schedule: from :func:`plstm_graph.compile_dag` (or ``DAGData.schedule`` for a PyG batch), on the
            same device as the inputs.
        backend: ``"auto"`` (default), ``"levels"``, ``"parallel"``, ``"paths"``, ``"reference"`` or
            ``"triton"``; see :func:`dag_backends` and the module docstring for what ``"auto"`` picks.
        recompute: ``levels`` / ``triton``: store no edge states for backward and recompute them instead.

    Example:
        >>> import torch
        >>> from plstm_graph import compile_dag, plstm_dag
        >>> s = compile_dag(torch.tensor([[0, 0, 1, 2], [1, 2, 3, 3]]), num_nodes=4)
        >>> N, E, L, H, K = 4, 4, 2, 2, 8
        >>> q, k, v = torch.randn(N, H, K), torch.randn(N, H, K), torch.randn(N, H, K)
        >>> y = plstm_dag(q, k, v, torch.rand(E, H), torch.rand(L, H), torch.rand(E, H), torch.rand(N, H), s)
        >>> y.shape
        torch.Size([4, 2, 8])
    """
    _check(q, k, v, source, transition, mark, direct, schedule)
    if backend == "auto":
        backend = _auto_backend(q, schedule)
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(_BACKENDS) + ['auto']}")
    out_dtype = v.dtype
    acc = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
    if backend == "reference":
        return plstm_dag_reference(q, k, v, source, transition, mark, direct, schedule)
    if backend == "triton":
        if not _triton_dag_available():
            raise RuntimeError(
                "backend='triton' needs the triton package and a CUDA device (or TRITON_INTERPRET=1 on CPU); "
                f"available here: {dag_backends()}"
            )
        from ...kernels import dag as _kdag

        return _kdag.plstm_dag_triton(q, k, v, source, transition, mark, direct, schedule, recompute=recompute)
    args = [t.to(acc) for t in (q, k, v, source, transition, mark, direct)]
    with torch.autocast(device_type=q.device.type, enabled=False):  # states stay in float32 under autocast
        if backend == "levels":
            y = plstm_dag_levels(*args, schedule, recompute=recompute)
        elif backend == "paths":
            y = plstm_dag_paths(*args, schedule)
        else:
            y = plstm_dag_parallel(*args, schedule)
    return y.to(out_dtype)
