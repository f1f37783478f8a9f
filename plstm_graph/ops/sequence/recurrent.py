"""Recurrent form: one O(1)-state step per token (decoding), and a loop of steps over a sequence.

The state of one sequence is ``[H, K, V]`` regardless of how many tokens it has seen.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .reference import sequence_bounds

__all__ = ["plstm_sequence_step", "plstm_sequence_recurrent"]


def plstm_sequence_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    source: torch.Tensor,
    transition: torch.Tensor,
    mark: torch.Tensor,
    direct: torch.Tensor,
    state: Optional[torch.Tensor],
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One step of the pLSTM sequence recurrence (SPEC section 4) for a batch of sequences.

    ``y = mark * (q^T C) + direct * (q . k) * v`` and ``C' = transition * C + source * (k outer v)``.

    ``backend``: ``"torch"`` (a few small kernels, differentiable), ``"triton"`` (the fused one-launch step
    of ``plstm_graph.kernels.sequence``, no autograd; 15 us at batch 8, H=16, K=V=128 on an H200 against 118 us
    for the torch step) or ``"auto"``: Triton on CUDA when triton is installed, no input needs a gradient (or
    grad mode is off), inputs are float32/bf16/fp16, the state is float32 (or None) and K, V <= 256; else torch.

    Shapes:
        q, k: ``[B, H, K]``; v: ``[B, H, V]``; gates: ``[B, H]``; state: ``[B, H, K, V]`` (float32 for
        half inputs) or None (zeros). Returns ``(y [B, H, V] in v's dtype, new_state [B, H, K, V])``.

    Example:
        >>> import torch
        >>> q, k, v = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 5)
        >>> g = torch.rand(2, 3)
        >>> y, state = plstm_sequence_step(q, k, v, g, g, g, g, None)
        >>> y.shape, state.shape
        (torch.Size([2, 3, 5]), torch.Size([2, 3, 4, 5]))
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "triton" or (backend == "auto" and _triton_step_applies(q, k, v, (source, transition, mark, direct),
                                                                         state)):
        from ...kernels.sequence import plstm_sequence_step_triton

        gates = [g.to(torch.float32) for g in (source, transition, mark, direct)]
        return plstm_sequence_step_triton(q, k, v, *gates, state)
    acc = torch.promote_types(v.dtype, torch.float32)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    s, t, m, d = (g.to(acc)[..., None] for g in (source, transition, mark, direct))  # [B, H, 1]
    qk = (qf * kf).sum(-1, keepdim=True)  # q . k   [B, H, 1]
    # few, small kernels: this step is what decoding runs (and what a CUDA graph captures) per token
    if state is None:
        y = d * qk * vf
        new_state = (s * kf)[..., :, None] * vf[..., None, :]
    else:
        state = state.to(acc)
        read = (qf[..., None, :] @ state)[..., 0, :]  # q^T C   [B, H, V]
        y = torch.addcmul(m * read, d * qk, vf)
        new_state = torch.addcmul(t[..., None] * state, (s * kf)[..., :, None], vf[..., None, :])
    return y.to(v.dtype), new_state


def _triton_step_applies(q, k, v, gates, state) -> bool:
    if not q.is_cuda:
        return False
    tensors = (q, k, v) + tuple(gates) + (() if state is None else (state,))
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    halfs = (torch.float32, torch.bfloat16, torch.float16)
    if q.dtype not in halfs or k.dtype not in halfs or v.dtype not in halfs:
        return False
    if state is not None and state.dtype != torch.float32:
        return False
    if q.shape[-1] > 256 or v.shape[-1] > 256:
        return False
    try:
        from ...kernels.sequence import available
    except ImportError:
        return False
    return available()


def plstm_sequence_recurrent(q, k, v, source, transition, mark, direct, initial_state=None, cu_seqlens=None):
    """A Python loop of :func:`plstm_sequence_step` over time, batched over the batch rows.

    Shapes as :func:`plstm_graph.plstm_sequence`; returns ``(y, final_state [N, H, K, V])``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = torch.promote_types(v.dtype, torch.float32)
    if cu_seqlens is None:
        segments = [(slice(None), 0, T, initial_state)]
    else:
        segments = [
            (slice(0, 1), s, e, None if initial_state is None else initial_state[n : n + 1])
            for n, (_, s, e) in enumerate(sequence_bounds(B, T, cu_seqlens))
        ]
    ys, finals = [], []
    for rows, start, end, state in segments:
        for t in range(start, end):
            y, state = plstm_sequence_step(
                q[rows, t], k[rows, t], v[rows, t], source[rows, t], transition[rows, t], mark[rows, t],
                direct[rows, t], state,
            )
            ys.append(y)
        if state is None:
            state = q.new_zeros((q[rows].shape[0], H, K, V), dtype=acc)
        finals.append(state.to(acc))
    y = torch.stack(ys, dim=1) if ys else v.new_zeros(B, 0, H, V)
    return y, torch.cat(finals)
