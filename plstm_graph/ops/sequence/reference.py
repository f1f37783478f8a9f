"""Readable reference of the pLSTM sequence operator: one time step at a time (the tests' oracle).

SPEC section 4, line by line, per sequence (``C_{-1}`` = initial state or 0)::

    y_t = mark_t * (q_t^T C_{t-1}) + direct_t * (q_t . k_t) * v_t
    C_t = transition_t * C_{t-1} + source_t * (k_t outer v_t)
    final_state = C_{T-1}

Plain autograd PyTorch, any float dtype (half inputs are computed in float32). Slow: tests only.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

__all__ = ["plstm_sequence_reference", "sequence_bounds"]


def sequence_bounds(batch: int, length: int, cu_seqlens: Optional[torch.Tensor]) -> List[Tuple[int, int, int]]:
    """(batch row, start, end) of every sequence: one per row, or the ``cu_seqlens`` segments of row 0."""
    if cu_seqlens is None:
        return [(b, 0, length) for b in range(batch)]
    cu = cu_seqlens.tolist()
    return [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def plstm_sequence_reference(q, k, v, source, transition, mark, direct, initial_state=None, cu_seqlens=None):
    """Shapes: q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; gates ``[B, T, H]``; initial_state
    ``[N, H, K, V]`` or None; returns ``(y [B, T, H, V] in v's dtype, final_state [N, H, K, V])`` with the
    state in float32 (float64 for float64 inputs)."""
    acc = torch.promote_types(v.dtype, torch.float32)
    q, k, v, source, transition, mark, direct = (
        t.to(acc) for t in (q, k, v, source, transition, mark, direct)
    )
    B, T, H, K = q.shape
    V = v.shape[-1]
    outputs = [[None] * T for _ in range(B)]
    finals = []
    for n, (b, start, end) in enumerate(sequence_bounds(B, T, cu_seqlens)):
        if initial_state is None:
            state = q.new_zeros(H, K, V)
        else:
            state = initial_state[n].to(acc)
        for t in range(start, end):
            read = torch.einsum("hk,hkv->hv", q[b, t], state)  # q_t^T C_{t-1}
            local = (q[b, t] * k[b, t]).sum(-1, keepdim=True) * v[b, t]  # (q_t . k_t) v_t
            outputs[b][t] = mark[b, t, :, None] * read + direct[b, t, :, None] * local
            outer = k[b, t, :, :, None] * v[b, t, :, None, :]  # [H, K, V]
            state = transition[b, t, :, None, None] * state + source[b, t, :, None, None] * outer
        finals.append(state)
    y = torch.stack([torch.stack(row) if T else q.new_zeros(0, H, V) for row in outputs])
    return y, torch.stack(finals)
