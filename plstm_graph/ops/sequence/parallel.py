"""Parallel ("attention") form: one T x T gating matrix per sequence and head.

On the chain, the path-sum matrix of SPEC section 2 is, with ``P(j, i) = prod_{j < p <= i} transition_p``,

    G[t, s] = mark_t * P(s, t-1) * source_s       (s < t),        G[t, t] = direct_t
    y       = (Q K^T * G) V  +  mark_t * P(-1, t-1) * q_t^T C_{-1}
    C_{T-1} = sum_s P(s, T-1) source_s k_s v_s^T  +  P(-1, T-1) C_{-1}

All products come from one exact :func:`segment_products` of ``[1, transition_0 .. transition_{T-1}]``
(no logarithms, so negative and zero transitions are exact). Memory is O(T^2): short sequences only.
"""
from __future__ import annotations

import torch

from .products import segment_products
from .reference import sequence_bounds

__all__ = ["plstm_sequence_parallel"]


def _parallel_one(q, k, v, source, transition, mark, direct, initial_state):
    """One batch of equal-length sequences. q, k [B, T, H, K]; gates [B, T, H]; state [B, H, K, V] or None."""
    B, T, H, K = q.shape
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, *]
    source, transition, mark, direct = (x.transpose(1, 2) for x in (source, transition, mark, direct))
    ones = transition.new_ones(B, H, 1)
    prods = segment_products(torch.cat([ones, transition], -1))  # [B, H, T+1, T+1]; index shifted by one
    decay = prods[..., :T, 1:]  # decay[t, s] = prod_{s < p < t} transition_p (0 unless s < t)
    gate = mark[..., :, None] * decay * source[..., None, :] + torch.diag_embed(direct)
    y = ((q @ k.transpose(-1, -2)) * gate) @ v  # [B, H, T, V]
    to_end = prods[..., T, 1:]  # prod_{s < p <= T-1} transition_p
    final = (k * (to_end * source)[..., None]).transpose(-1, -2) @ v  # [B, H, K, V]
    if initial_state is not None:
        from_start = prods[..., :T, 0]  # prod_{0 <= p < t} transition_p
        y = y + (q * (mark * from_start)[..., None]) @ initial_state
        final = final + prods[..., T, 0, None, None] * initial_state
    return y.transpose(1, 2), final


def plstm_sequence_parallel(q, k, v, source, transition, mark, direct, initial_state=None, cu_seqlens=None):
    """Shapes as :func:`plstm_graph.plstm_sequence`; inputs already in the accumulation dtype."""
    if cu_seqlens is None:
        return _parallel_one(q, k, v, source, transition, mark, direct, initial_state)
    ys, finals = [], []
    for n, (_, s, e) in enumerate(sequence_bounds(q.shape[0], q.shape[1], cu_seqlens)):
        init = None if initial_state is None else initial_state[n : n + 1]
        y, f = _parallel_one(*(x[:, s:e] for x in (q, k, v, source, transition, mark, direct)), init)
        ys.append(y)
        finals.append(f)
    return torch.cat(ys, 1), torch.cat(finals)
