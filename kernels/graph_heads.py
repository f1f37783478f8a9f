"""The middle of a pLSTM graph layer in one autograd Function: stacked projection -> gates -> DAG operator.

:meth:`PLSTMGraphLayer.heads <plstm_graph.nn.PLSTMGraphLayer.heads>` computes, from ``P = x W^T`` (the q, k, v
and node-gate projections stacked column-wise, ``[N, 3 H K + 8 H]``)::

    q, k, v, g = P[:, :HK], P[:, HK:2HK], P[:, 2HK:3HK], P[:, 3HK:]
    gates = graph_gates(g, e, biases)                         (kernels.graph_gates)
    y = plstm_dag(q * K^-0.5, k, v, *gates)                   (kernels.dag, SPEC section 2)

Its readable form is two autograd Functions (gates, operator) with torch ops between them: the scaling of
``q`` (a multiply forward and backward), contiguous copies of ``k`` and ``v`` (column slices of ``P``) before
the operator, and in the backward the concatenation of ``dq, dk, dv, dg`` into ``dP``. On a molecule batch each
of those is a few microseconds of GPU work behind ~15-20 us of host time, and the step is bound by the host
(issue #4). Here:

* the DAG kernels read ``q, k, v`` in place from ``P`` (row stride ``3 H K + 8 H``) and scale ``q`` as they
  load it; the gate kernels read ``g`` in place;
* the backward allocates ONE zeroed buffer: ``dP`` (the DAG backward writes ``dq, dk, dv`` into its columns,
  with the ``K^-0.5`` of ``dq`` applied in the kernels, and the gate backward accumulates ``dg`` into the
  rest), the gate gradients between the two backward passes, and the gate kernels' edge, bias and group sums;
* one Function instead of two: one ``apply`` and one Python backward per layer call.

The same kernels as the two-Function path do the work; the tests compare this Function with the readable
layer (outputs and every gradient).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from . import dag as _kd
from . import graph_gates as _kg

__all__ = ["graph_heads_triton"]


class _GraphHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, e, b_s, b_m, b_t, b_d, tail, head, la, lb, eid, schedule, num_heads, head_dim, q_scale,
                transition_scale, normalize, recompute, strategy, chunk_bytes):
        n, hk = p.size(0), num_heads * head_dim
        if p.stride(-1) != 1:
            p = p.contiguous()
        q, k, v = (p[:, i * hk:(i + 1) * hk].view(n, num_heads, head_dim) for i in range(3))
        gates = _kg._gates_forward(p[:, 3 * hk:], e, (b_s, b_m, b_t, b_d), tail, head, la, lb, eid, num_heads,
                                   transition_scale, normalize)
        src, mark, trans, direct = gates[:4]
        y, state = _kd._dag_forward(ctx, q, k, v, src, trans, mark, direct, schedule, recompute, strategy,
                                    chunk_bytes, qs=q_scale)
        ctx.save_for_backward(p, *gates, tail, head, la, lb, eid if eid is not None else tail,
                              *([state] if state is not None else []))
        ctx.meta = (num_heads, head_dim, float(q_scale), float(transition_scale), bool(normalize),
                    e.size(0) if e is not None else 0, eid is not None, e.dtype if e is not None else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        h, hd, q_scale, t_scale, norm, e_rows, has_eid, e_dtype = ctx.meta
        p, *rest = ctx.saved_tensors
        gates, state = rest[:11], (rest[11] if len(rest) > 11 else None)
        src, mark, trans, direct = gates[:4]
        n, hk = p.size(0), h * hd
        q, k, v = (p[:, i * hk:(i + 1) * hk].view(n, h, hd) for i in range(3))
        ne, nl = src.size(0), trans.size(0)
        # ONE zeroed allocation: dP (dq, dk, dv written, dg accumulated), the gate gradients, the gate kernels'
        # edge / bias gradients and group reductions
        sizes = [n * p.size(1), (2 * ne + nl + n) * h] + _kg._backward_sizes(n, ne, h, norm, e_rows)
        dp, zero, *bufs = _kg._split16(sizes, torch.float32, p.device, zero=True)
        dp = dp.view(n, p.size(1))
        dq, dk, dv = (dp[:, i * hk:(i + 1) * hk].view(n, h, hd) for i in range(3))
        dsrc, dtrans, dmark, ddirect = _kd._dag_backward(ctx, q, k, v, src, trans, mark, direct, state, dy, dq, dk,
                                                         dv, qs=q_scale, zero=zero)
        _, de, db = _kg._gates_backward(gates, dsrc, dmark, dtrans, ddirect, h, t_scale, norm, e_rows, has_eid,
                                        dg=dp[:, 3 * hk:], bufs=bufs)
        return ((dp.to(p.dtype), de.to(e_dtype) if e_dtype is not None else None, db[0], db[1], db[2], db[3])
                + (None,) * 14)


def graph_heads_triton(
    p: torch.Tensor, e: Optional[torch.Tensor], biases: Sequence[torch.Tensor], schedule, num_heads: int,
    head_dim: int, q_scale: float, transition_scale: float, normalize: bool, recompute: bool = False,
    strategy: str = "auto", chunk_bytes: Optional[int] = None,
) -> torch.Tensor:
    """``plstm_dag(q * q_scale, k, v, *graph_gates(g, e, *biases))`` with ``q, k, v, g`` the column blocks of ``p``.

    Args:
        p: ``[N, 3 * H * K + 8 * H]`` (float32 / bfloat16 / float16): the stacked projection ``[q | k | v | g]``
            of :meth:`PLSTMGraphLayer.project <plstm_graph.nn.PLSTMGraphLayer.project>` (``g``'s columns in
            the layer's slot order, see :mod:`plstm_graph.kernels.graph_gates`).
        e: ``[E_in, H * 4]`` edge gate pre-activations or ``None`` (schedule edge ``j`` reads row
            ``schedule.input_edge_ids[j]``, or row ``j``).
        biases: the ``[H]`` source, mark, transition and direct biases.
        schedule: the layer's :class:`~plstm_graph.graph.DAGSchedule`.
        q_scale: the factor on ``q`` (the layer's ``K^-0.5``); ``transition_scale``, ``normalize``: the
            layer's (P-mode normalisation).
        recompute, strategy, chunk_bytes: as :func:`plstm_graph.kernels.dag.plstm_dag_triton`.

    Returns ``y [N, H, K]`` in ``p``'s dtype (states and accumulation float32). Gradients flow to ``p``, ``e``
    and the biases. CPU tensors need ``TRITON_INTERPRET=1``.

    Example (CPU needs ``TRITON_INTERPRET=1``):
        >>> import torch
        >>> from plstm_graph import compile_dag
        >>> s = compile_dag(torch.tensor([[0, 1], [1, 2]]), num_nodes=3)
        >>> b = [torch.zeros(2)] * 4
        >>> graph_heads_triton(torch.randn(3, 3 * 8 + 16), None, b, s, 2, 4, 0.5, 5.0, True).shape
        torch.Size([3, 2, 4])
    """
    h, hd = int(num_heads), int(head_dim)
    if p.dim() != 2 or p.size(1) != 3 * h * hd + 8 * h:
        raise ValueError(f"p must be [N, 3 * H * K + 8 * H] = [N, {3 * h * hd + 8 * h}], got {list(p.shape)}")
    if p.dtype not in _kg.SUPPORTED_DTYPES:
        raise TypeError(f"graph_heads_triton takes {_kg.SUPPORTED_DTYPES} projections, got {p.dtype}")
    if p.size(0) != schedule.num_nodes:
        raise ValueError(f"p has {p.size(0)} rows but the schedule has {schedule.num_nodes} nodes")
    _kd._blocks(hd, hd)  # head size limits (a clear error)
    if p.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("graph_heads_triton on CPU tensors needs TRITON_INTERPRET=1 (set before importing triton)")
    if strategy == "auto":
        strategy = _kd._choose_strategy(schedule)
    tail, head = schedule.edge_index
    la, lb = schedule.line_index
    eid = schedule.input_edge_ids
    return _GraphHeads.apply(p, e, *biases, tail.contiguous(), head.contiguous(), la.contiguous(), lb.contiguous(),
                             eid.contiguous() if eid is not None else None, schedule, h, hd, float(q_scale),
                             float(transition_scale), bool(normalize), bool(recompute), strategy,
                             int(chunk_bytes) if chunk_bytes is not None else 0)
