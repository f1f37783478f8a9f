"""Chunkwise form: matmuls inside chunks, a short linear scan across chunks. O(T * chunk) memory.

The sequence is cut into chunks of ``c`` steps (padded with neutral steps: q = k = v = 0, source = mark =
direct = 0, transition = 1, which leave every output and state unchanged). With the exact segment products
of :mod:`.products` of ``[1, transition_0 .. transition_{c-1}]`` inside one chunk,

    decay[i, j]   = prod_{j < p < i} t_p        from_start[i] = prod_{p < i} t_p
    to_end[j]     = prod_{j < p < c} t_p        total         = prod_{p < c} t_p

every chunk ``n`` is handled at once, batched over (batch, head, chunk):

    1. intra-chunk:  Y_n  = (Q_n K_n^T * (mark_i decay[i, j] source_j + diag(direct))) V_n
    2. chunk states: U_n  = (K_n * to_end * source)^T V_n                      (state made inside chunk n)
    3. scan:         P_n  = total_{n-1} P_{n-1} + U_{n-1}      (P_n: state entering chunk n, P_0 = C_{-1})
    4. inter-chunk:  Y_n += (Q_n * mark * from_start) P_n

Step 3 is itself a linear recurrence with scalar decays; :func:`chunk_scan` solves it with dense
segment-product matmuls over blocks of 32 chunks and recurses on the block ends, so there is no Python loop
over chunks and a T = 32k sequence never builds a T x T matrix.

Variable-length batches (``cu_seqlens``) pad every sequence to whole chunks and lay the chunks end to end;
the scan restarts at each sequence's first chunk (decay 0, entry = that sequence's initial state).

Precision: with half-precision inputs the matmuls and their gate weightings run in the input dtype
(float32 accumulation inside each matmul), while gate products, chunk states and the cross-chunk scan are
float32, much as flash-linear-attention's kernels do.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

from .products import segment_products

__all__ = ["plstm_sequence_chunkwise", "chunk_scan"]

_SCAN_BLOCK = 32  # fp32 matmul work per chunk ~ block; 32 balances it against memory traffic


def chunk_scan(decay: torch.Tensor, entries: torch.Tensor, block: int = _SCAN_BLOCK) -> torch.Tensor:
    """Solve ``P_n = decay_n * P_{n-1} + entries_n`` (``P_{-1} = 0``) without a loop over ``n``.

    Shapes:
        decay: ``[..., N]``; entries: ``[..., N, D]`` -> ``P: [..., N, D]``.

    Example:
        >>> import torch
        >>> chunk_scan(torch.tensor([9.0, 0.5, -2.0]), torch.tensor([[1.0], [1.0], [1.0]])).flatten()
        tensor([ 1.0000,  1.5000, -2.0000])
    """
    n = decay.shape[-1]
    if n <= block:
        return segment_products(decay) @ entries
    num_blocks = math.ceil(n / block)
    pad = num_blocks * block - n
    if pad:
        decay = F.pad(decay, (0, pad), value=1.0)
        entries = F.pad(entries, (0, 0, 0, pad))
    decay = decay.unflatten(-1, (num_blocks, block))  # [..., NB, S]
    entries = entries.unflatten(-2, (num_blocks, block))  # [..., NB, S, D]
    prods = segment_products(torch.cat([torch.ones_like(decay[..., :1]), decay], -1))  # [..., NB, S+1, S+1]
    local = prods[..., 1:, 1:] @ entries  # scan inside each block from a zero state
    from_start = prods[..., 1:, 0]  # prod of decay from the block start through row n   [..., NB, S]
    carry = chunk_scan(from_start[..., -1], local[..., -1, :], block)  # state at each block end
    carry_in = F.pad(carry[..., :-1, :], (0, 0, 1, 0))  # state entering each block
    out = torch.addcmul(local, from_start[..., None], carry_in[..., None, :])
    return out.flatten(-3, -2)[..., :n, :]


def _to_chunks(x: torch.Tensor, num_chunks: int, chunk: int) -> torch.Tensor:
    """[B, T', H, *] (T' = num_chunks * chunk) -> [B, H, NC, c, *], contiguous: one copy here instead of
    one inside every matmul and elementwise op that reads it."""
    b, _, h = x.shape[:3]
    x = x.reshape(b, num_chunks, chunk, h, *x.shape[3:])
    return (x.permute(0, 3, 1, 2, *range(4, x.dim())) if x.dim() > 4 else x.permute(0, 3, 1, 2)).contiguous()


def _core(qc, kc, vc, sc, tc, mc, dc, starts, init_at_chunk, last_chunk, acc):
    """Chunked inputs [B, H, NC, c, *]; gates [B, H, NC, c] in ``acc``, or [1, H, 1, c] when they are the
    same for every batch row and chunk (retention), so that their products are computed once per head.
    ``starts`` [NC] marks chunks that begin a sequence (None: only chunk 0), ``init_at_chunk`` the state
    entering those chunks. Returns y [B, H, NC, c, V] (matmul dtype) and the float32 states after each
    ``last_chunk``."""
    mm = qc.dtype
    B, H, NC, c, K = qc.shape
    V = vc.shape[-1]
    prods = segment_products(torch.cat([torch.ones_like(tc[..., :1]), tc], -1))  # [., H, ., c+1, c+1]
    decay = prods[..., :c, 1:]
    from_start = prods[..., :c, 0]
    to_end = prods[..., c, 1:]
    total = prods[..., c, 0].expand(B, H, NC)

    # 1. intra-chunk attention-like part
    gate = mc[..., :, None] * decay * sc[..., None, :] + torch.diag_embed(dc)  # [., H, ., c, c]
    scores = (qc @ kc.transpose(-1, -2)) * gate.to(mm)  # in the matmul dtype, like the state reads below
    y_intra = scores @ vc  # [B, H, NC, c, V]

    # 2. state each chunk adds by its end, batched over chunks
    k_weighted = kc * (to_end * sc).to(mm)[..., None]
    local = k_weighted.transpose(-1, -2) @ vc  # [B, H, NC, K, V], matmul dtype

    # 3. states entering each chunk: P_n = total_{n-1} P_{n-1} + U_{n-1}, restarted at sequence starts
    shifted_total = F.pad(total[..., :-1], (1, 0))
    if starts is None:
        decay_c = shifted_total
        first = torch.zeros((), dtype=acc, device=qc.device) if init_at_chunk is None else init_at_chunk
        # (cat promotes the matmul-dtype chunk states to float32 in the same pass)
        entries = torch.cat([first.to(acc).expand(B, H, 1, K, V), local[..., :-1, :, :]], 2)
    else:
        decay_c = torch.where(starts, torch.zeros_like(shifted_total), shifted_total)
        shifted_local = F.pad(local[..., :-1, :, :].to(acc), (0, 0, 0, 0, 1, 0))
        init = torch.zeros((), dtype=acc, device=qc.device) if init_at_chunk is None else init_at_chunk
        entries = torch.where(starts[:, None, None], init, shifted_local)
    entering = chunk_scan(decay_c, entries.flatten(-2)).unflatten(-1, (K, V))  # [B, H, NC, K, V]

    # 4. read of the entering state
    q_weighted = (qc * (mc * from_start).to(mm)[..., None]).expand(B, H, NC, c, K)
    # (contiguous operands: a stride-0 or transposed batch operand sends the backward's bmm to a slow
    # fallback kernel, 100x slower on CPU)
    y = torch.baddbmm(  # y_intra + q_weighted @ entering, the add fused into the matmul
        y_intra.reshape(-1, c, V), q_weighted.reshape(-1, c, K).contiguous(),
        entering.to(mm).reshape(-1, K, V).contiguous(),
    ).view(B, H, NC, c, V)

    final = total[..., last_chunk, None, None] * entering[..., last_chunk, :, :] + local[..., last_chunk, :, :].to(acc)
    return y, final


def _shared_over_batch_and_time(g: torch.Tensor) -> bool:
    """True for gates broadcast from a per-head value (``expand``ed, stride 0 over B and T)."""
    return (g.shape[0] == 1 or g.stride(0) == 0) and (g.shape[1] == 1 or g.stride(1) == 0)


def plstm_sequence_chunkwise(
    q, k, v, source, transition, mark, direct, initial_state=None, cu_seqlens=None, chunk_size: int = 64
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Shapes as :func:`plstm_graph.plstm_sequence`. q, k, v in their own dtype (matmul dtype); gates and
    initial_state already in the accumulation dtype. Returns ``(y in the matmul dtype, final_state)``."""
    acc = source.dtype
    B, T, H, K = q.shape
    V = v.shape[-1]
    dev = q.device
    neutral = {"source": 0.0, "transition": 1.0, "mark": 0.0, "direct": 0.0}
    gates = {"source": source, "transition": transition, "mark": mark, "direct": direct}
    if cu_seqlens is None:
        c = max(1, min(chunk_size, T))
        nc = max(1, math.ceil(T / c))
        pad = nc * c - T
        tensors = [F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x for x in (q, k, v)]
        starts = None
        last = slice(nc - 1, nc)
        init = None if initial_state is None else initial_state[:, :, None]  # enters chunk 0
        if pad == 0 and all(_shared_over_batch_and_time(g) for g in gates.values()):
            # one value per head (retention): chunk-local products once per head, broadcast everywhere
            shared = [g[:1, :1].permute(0, 2, 1)[..., None].expand(1, H, 1, c) for g in gates.values()]
            qc, kc, vc = (_to_chunks(x, nc, c) for x in tensors)
            y, final = _core(qc, kc, vc, *shared, starts, init, last, acc)
            return y.permute(0, 2, 3, 1, 4).reshape(B, T, H, V), final[:, :, 0]
        tensors += [F.pad(g, (0, 0, 0, pad), value=neutral[name]) for name, g in gates.items()]
    else:
        c = chunk_size
        cu = cu_seqlens.tolist()
        lens = [e - s for s, e in zip(cu[:-1], cu[1:])]
        counts = [max(1, math.ceil(n / c)) for n in lens]
        offsets = [0]
        for n in counts:
            offsets.append(offsets[-1] + n)
        nc = offsets[-1]
        gather = torch.full((nc * c,), T, dtype=torch.long)  # index T = the appended neutral row
        token_pos = torch.empty(T, dtype=torch.long)
        for i, (s, n) in enumerate(zip(cu[:-1], lens)):
            gather[offsets[i] * c : offsets[i] * c + n] = torch.arange(s, s + n)
            token_pos[s : s + n] = torch.arange(offsets[i] * c, offsets[i] * c + n)
        gather, token_pos = gather.to(dev), token_pos.to(dev)
        tensors = []
        for x in (q, k, v):
            tensors.append(torch.cat([x[0], x.new_zeros(1, *x.shape[2:])]).index_select(0, gather)[None])
        for name, g in gates.items():
            row = g.new_full((1, H), neutral[name])
            tensors.append(torch.cat([g[0], row]).index_select(0, gather)[None])
        starts = torch.zeros(nc, dtype=torch.bool)
        starts[offsets[:-1]] = True  # chunks that begin a sequence
        starts = starts.to(dev)
        last = torch.tensor([o + n - 1 for o, n in zip(offsets[:-1], counts)], device=dev)
        if initial_state is not None:
            seq_of_chunk = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(dev)
            init = initial_state.index_select(0, seq_of_chunk).permute(1, 0, 2, 3)[None]  # [1, H, NC, K, V]
        else:
            init = None
    qc, kc, vc = (_to_chunks(x, nc, c) for x in tensors[:3])
    sc, tc, mc, dc = (_to_chunks(g, nc, c) for g in tensors[3:])
    y, final = _core(qc, kc, vc, sc, tc, mc, dc, starts, init, last, acc)
    y = y.permute(0, 2, 3, 1, 4).reshape(y.shape[0], nc * c, H, V)  # [B, T', H, V]
    if cu_seqlens is None:
        return y[:, :T], final[:, :, 0]
    return y.index_select(1, token_pos), final[0].transpose(0, 1)
