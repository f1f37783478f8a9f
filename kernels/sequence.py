"""Triton kernels of the pLSTM sequence operator (SPEC section 4): a fused recurrent scan, forward and backward.

:func:`plstm_sequence_triton` runs the chunkwise tensor-core kernels of :mod:`.sequence_chunk` when they
apply (every transition > 0, no ``cu_seqlens``; e.g. retention) and otherwise the general recurrent scan of
this module: one program per (sequence, head, V-block) keeps the state ``C`` (``[K, BV]``, float32) in
registers and walks the tokens:

    y_t = m_t q_t^T C_{t-1} + d_t (q_t . k_t) v_t,      C_t = tau_t C_{t-1} + s_t k_t v_t^T

The forward stores a checkpoint of ``C`` every ``chunk_size`` tokens. The backward walks the chunks from the
last: it recomputes the chunk's states from its checkpoint into a per-program scratch buffer, then runs the
adjoint recurrence ``dC_{t-1} = tau_t dC_t + m_t q_t dy_t^T`` backwards, emitting

    dtau_t = <C_{t-1}, dC_t>,  dm_t = q_t^T C_{t-1} dy_t,  dq_t += m_t C_{t-1} dy_t,
    ds_t = k_t^T dC_t v_t,  dk_t += s_t dC_t v_t,  dv_t += s_t dC_t^T k_t,   d initial_state = dC_{-1}

(sums over V-blocks by fp32 atomics; the direct term's gradients are elementwise torch). Sequences are
``B`` rows of length ``T`` or, with ``cu_seqlens``, packed along ``T`` (``B = 1``); their count and lengths
are runtime values (never constexpr). Memory: checkpoints ``ceil(T / chunk_size) * H * K * V * 4`` bytes
per sequence, plus a scratch of ``chunk_size * K * BV * 4`` bytes per program in the backward.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch

from ._common import next_pow2 as _pow2
from ._common import HAVE_TRITON as _HAVE_TRITON
from ._common import available
from ._common import bind_triton as _bind_triton
from ._common import lazy_jit as _lazy_jit

# triton is imported on first use, never at import: the package works without it, and a test that sets
# TRITON_INTERPRET=1 still gets the CPU interpreter when another module imported this one first.
triton = None
tl = None


def _import_triton():
    return _bind_triton(globals())


__all__ = ["available", "plstm_sequence_triton", "plstm_sequence_step_triton"]

MAX_HEAD_DIM = 256




def _jit(fn, **kw):
    """``triton.jit(fn)`` on first use (see :func:`._common.lazy_jit`)."""
    return _lazy_jit(fn, _import_triton(), **kw)


def _seq_fwd(q, k, v, src, trn, mrk, dirc, y, h0, hT, ckpt, cu, ck_off, H, CS,
             K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
             HAS_H0: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    vb = tl.program_id(2)
    offk = tl.arange(0, BK)
    offv = vb * BV + tl.arange(0, BV)
    mk = offk < K
    mv = offv < V
    mt = mk[:, None] & mv[None, :]
    tile = offk[:, None] * V + offv[None, :]
    start = tl.load(cu + n).to(tl.int64)
    end = tl.load(cu + n + 1).to(tl.int64)
    c_idx = tl.load(ck_off + n).to(tl.int64)
    if HAS_H0:
        c = tl.load(h0 + (n * H + h) * (K * V) + tile, mask=mt, other=0.0).to(tl.float32)
    else:
        c = tl.zeros([BK, BV], dtype=tl.float32)
    t = start
    while t < end:
        if (t - start) % CS == 0:
            tl.store(ckpt + (c_idx * H + h) * (K * V) + tile, c, mask=mt)
            c_idx += 1
        qq = tl.load(q + (t * H + h) * K + offk, mask=mk, other=0.0).to(tl.float32)
        kk = tl.load(k + (t * H + h) * K + offk, mask=mk, other=0.0).to(tl.float32)
        vv = tl.load(v + (t * H + h) * V + offv, mask=mv, other=0.0).to(tl.float32)
        s = tl.load(src + t * H + h).to(tl.float32)
        tau = tl.load(trn + t * H + h).to(tl.float32)
        m = tl.load(mrk + t * H + h).to(tl.float32)
        d = tl.load(dirc + t * H + h).to(tl.float32)
        out = m * tl.sum(qq[:, None] * c, axis=0) + (d * tl.sum(qq * kk, axis=0)) * vv
        tl.store(y + (t * H + h) * V + offv, out, mask=mv)
        c = tau * c + s * (kk[:, None] * vv[None, :])
        t += 1
    tl.store(hT + (n * H + h) * (K * V) + tile, c, mask=mt)

def _seq_bwd(q, k, v, src, trn, mrk, dy, dhT, ckpt, scratch, dq, dk, dv, ds, dtr, dm, dh0, cu, ck_off,
             H, CS, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    vb = tl.program_id(2)
    prog = (n * H + h) * tl.num_programs(2) + vb
    offk = tl.arange(0, BK)
    offv = vb * BV + tl.arange(0, BV)
    mk = offk < K
    mv = offv < V
    mt = mk[:, None] & mv[None, :]
    tile = offk[:, None] * V + offv[None, :]
    stile = offk[:, None] * BV + tl.arange(0, BV)[None, :]  # scratch rows are [BK, BV]
    start = tl.load(cu + n).to(tl.int64)
    end = tl.load(cu + n + 1).to(tl.int64)
    c0 = tl.load(ck_off + n).to(tl.int64)
    c_last = tl.load(ck_off + n + 1).to(tl.int64) - 1
    dc = tl.load(dhT + (n * H + h) * (K * V) + tile, mask=mt, other=0.0)
    base = scratch + prog * CS * (BK * BV)
    ci = c_last
    while ci >= c0:
        t0 = start + (ci - c0) * CS
        t1 = tl.minimum(t0 + CS, end)
        c = tl.load(ckpt + (ci * H + h) * (K * V) + tile, mask=mt, other=0.0)
        t = t0
        while t < t1:  # recompute the chunk's states: scratch[t - t0] = C_{t-1}
            tl.store(base + (t - t0) * (BK * BV) + stile, c)
            kk = tl.load(k + (t * H + h) * K + offk, mask=mk, other=0.0).to(tl.float32)
            vv = tl.load(v + (t * H + h) * V + offv, mask=mv, other=0.0).to(tl.float32)
            s = tl.load(src + t * H + h).to(tl.float32)
            tau = tl.load(trn + t * H + h).to(tl.float32)
            c = tau * c + s * (kk[:, None] * vv[None, :])
            t += 1
        tl.debug_barrier()
        t = t1 - 1
        while t >= t0:
            cp = tl.load(base + (t - t0) * (BK * BV) + stile, cache_modifier=".cg")
            qq = tl.load(q + (t * H + h) * K + offk, mask=mk, other=0.0).to(tl.float32)
            kk = tl.load(k + (t * H + h) * K + offk, mask=mk, other=0.0).to(tl.float32)
            vv = tl.load(v + (t * H + h) * V + offv, mask=mv, other=0.0).to(tl.float32)
            gy = tl.load(dy + (t * H + h) * V + offv, mask=mv, other=0.0).to(tl.float32)
            s = tl.load(src + t * H + h).to(tl.float32)
            tau = tl.load(trn + t * H + h).to(tl.float32)
            m = tl.load(mrk + t * H + h).to(tl.float32)
            # through C_t = tau C_{t-1} + s k v^T
            dcv = tl.sum(dc * vv[None, :], axis=1)  # [BK]
            tl.atomic_add(ds + t * H + h, tl.sum(dcv * kk, axis=0))
            tl.atomic_add(dk + (t * H + h) * K + offk, s * dcv, mask=mk)
            tl.atomic_add(dv + (t * H + h) * V + offv, s * tl.sum(dc * kk[:, None], axis=0), mask=mv)
            tl.atomic_add(dtr + t * H + h, tl.sum(tl.sum(cp * dc, axis=1), axis=0))
            # through y_t = m q^T C_{t-1}
            cdy = tl.sum(cp * gy[None, :], axis=1)  # [BK]
            tl.atomic_add(dm + t * H + h, tl.sum(qq * cdy, axis=0))
            tl.atomic_add(dq + (t * H + h) * K + offk, m * cdy, mask=mk)
            dc = tau * dc + m * (qq[:, None] * gy[None, :])
            t -= 1
        tl.debug_barrier()  # the scratch is rewritten by the previous chunk
        ci -= 1
    tl.store(dh0 + (n * H + h) * (K * V) + tile, dc, mask=mt)


def _seq_step(q, k, v, src, trn, mrk, dirc, state, y, new_state, H,
              K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_STATE: tl.constexpr):
    """One decoding step for program (b, h, V-block): read out, then update the state."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    vb = tl.program_id(2)
    offk = tl.arange(0, BK)
    offv = vb * BV + tl.arange(0, BV)
    mk = offk < K
    mv = offv < V
    mt = mk[:, None] & mv[None, :]
    tile = (b * H + h) * (K * V) + offk[:, None] * V + offv[None, :]
    qq = tl.load(q + (b * H + h) * K + offk, mask=mk, other=0.0).to(tl.float32)
    kk = tl.load(k + (b * H + h) * K + offk, mask=mk, other=0.0).to(tl.float32)
    vv = tl.load(v + (b * H + h) * V + offv, mask=mv, other=0.0).to(tl.float32)
    s = tl.load(src + b * H + h).to(tl.float32)
    tau = tl.load(trn + b * H + h).to(tl.float32)
    m = tl.load(mrk + b * H + h).to(tl.float32)
    d = tl.load(dirc + b * H + h).to(tl.float32)
    out = (d * tl.sum(qq * kk, axis=0)) * vv
    upd = s * (kk[:, None] * vv[None, :])
    if HAS_STATE:
        c = tl.load(state + tile, mask=mt, other=0.0).to(tl.float32)
        out += m * tl.sum(qq[:, None] * c, axis=0)
        upd += tau * c
    tl.store(y + (b * H + h) * V + offv, out, mask=mv)
    tl.store(new_state + tile, upd, mask=mt)


def _blocks(dk: int, dv: int):
    if not (1 <= dk <= MAX_HEAD_DIM and 1 <= dv <= MAX_HEAD_DIM):
        raise ValueError(f"backend='triton' supports head dims 1..{MAX_HEAD_DIM}, got K={dk}, V={dv}")
    bk = _pow2(dk)
    bv = min(_pow2(dv), max(16, 4096 // bk))
    warps = min(16, max(1, bk * bv // 256))
    return bk, bv, warps


def _flatten(q, k, v, gates, cu_seqlens):
    B, T, H, K = q.shape
    if cu_seqlens is None:
        cu = torch.arange(B + 1, device=q.device, dtype=torch.int64) * T
        lens = [T] * B
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int64)
        c = cu.tolist()
        lens = [b - a for a, b in zip(c[:-1], c[1:])]
    flat = [t.reshape(B * T, H, -1).contiguous() for t in (q, k, v)]
    gflat = [g.reshape(B * T, H).contiguous() for g in gates]
    return flat, gflat, cu, lens


class _SeqScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, source, transition, mark, direct, initial_state, cu_seqlens, chunk_size):
        B, T, H, K = q.shape
        V = v.shape[-1]
        (qf, kf, vf), gates, cu, lens = _flatten(q, k, v, (source, transition, mark, direct), cu_seqlens)
        N = len(lens)
        cs = max(1, min(chunk_size, max(lens) if lens else 1))
        nck = [max(1, math.ceil(n / cs)) for n in lens]
        ck_off = torch.tensor([0] + nck, dtype=torch.int64).cumsum(0).to(q.device)
        bk, bv, warps = _blocks(K, V)
        f32 = dict(dtype=torch.float32, device=q.device)
        ckpt = torch.zeros(int(sum(nck)), H, K, V, **f32)
        y = torch.empty(B * T, H, V, dtype=v.dtype, device=v.device)
        hT = torch.empty(N, H, K, V, **f32)
        h0 = initial_state.contiguous() if initial_state is not None else hT
        grid = (N, H, -(-V // bv))
        if N:
            _jit(_seq_fwd, do_not_specialize=["CS"])[grid](qf, kf, vf, *gates, y, h0, hT, ckpt, cu, ck_off, H, cs, K=K, V=V, BK=bk, BV=bv,
                           HAS_H0=initial_state is not None, num_warps=warps)
        ctx.save_for_backward(qf, kf, vf, *gates, ckpt, cu, ck_off)
        ctx.meta = (B, T, H, K, V, N, cs, initial_state is not None,
                    initial_state.dtype if initial_state is not None else None, [t.dtype for t in (q, k, v)],
                    [g.dtype for g in (source, transition, mark, direct)])
        return y.view(B, T, H, V), hT

    @staticmethod
    def backward(ctx, dy, dhT):
        qf, kf, vf, s, tr, m, d, ckpt, cu, ck_off = ctx.saved_tensors
        B, T, H, K, V, N, cs, has_h0, h0_dtype, qkv_dt, g_dt = ctx.meta
        f32 = dict(dtype=torch.float32, device=qf.device)
        dyf = dy.reshape(B * T, H, V).contiguous()
        q32, k32, v32, dy32, d32 = qf.float(), kf.float(), vf.float(), dyf.float(), d.float()
        qk = (q32 * k32).sum(-1)
        dyv = (dy32 * v32).sum(-1)
        dq = ((d32 * dyv)[..., None] * k32).contiguous()
        dk = ((d32 * dyv)[..., None] * q32).contiguous()
        dv = ((d32 * qk)[..., None] * dy32).contiguous()
        dd = qk * dyv
        ds_, dtr, dm = (torch.zeros(B * T, H, **f32) for _ in range(3))
        dh0 = torch.zeros(N, H, K, V, **f32)
        bk, bv, warps = _blocks(K, V)
        nvb = -(-V // bv)
        if N:
            scratch = torch.empty(N * H * nvb * cs, bk, bv, **f32)
            dhT = (dhT if dhT is not None else torch.zeros(N, H, K, V, **f32)).float().contiguous()
            _jit(_seq_bwd, do_not_specialize=["CS"])[(N, H, nvb)](qf, kf, vf, s, tr, m, dyf, dhT, ckpt, scratch, dq, dk, dv, ds_, dtr, dm, dh0,
                                  cu, ck_off, H, cs, K=K, V=V, BK=bk, BV=bv, num_warps=warps)
        shp = lambda t, dt: t.view(B, T, H, *t.shape[2:]).to(dt)  # noqa: E731
        grads = (
            shp(dq, qkv_dt[0]), shp(dk, qkv_dt[1]), shp(dv, qkv_dt[2]),
            shp(ds_, g_dt[0]), shp(dtr, g_dt[1]), shp(dm, g_dt[2]), shp(dd, g_dt[3]),
            dh0.to(h0_dtype) if has_h0 else None,
        )
        return grads + (None, None)


def plstm_sequence_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    source: torch.Tensor,
    transition: torch.Tensor,
    mark: torch.Tensor,
    direct: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
    strategy: str = "auto",
    transitions_positive: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton pLSTM sequence operator (SPEC section 4); differentiable in every input.

    ``strategy="auto"`` runs the chunkwise tensor-core kernels (:mod:`.sequence_chunk`) when they apply
    (every transition > 0, no ``cu_seqlens``, q/k/v of one dtype; e.g. retention) and otherwise this
    module's fused recurrent scan; ``"chunk"`` insists on the former, ``"scan"`` on the latter.

    Shapes:
        q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; gates ``[B, T, H]``; initial_state ``[N, H, K, V]`` or None
        (N = B, or the number of sequences of ``cu_seqlens`` with B = 1). Returns ``y [B, T, H, V]`` in
        ``v``'s dtype and ``final_state [N, H, K, V]`` float32. ``K, V <= 256``. ``chunk_size``: tokens
        between the checkpoints kept for the backward (scan), or the chunk length (chunk: rounded to a power
        of two in [16, 64]). ``transitions_positive=True``: the caller guarantees every transition > 0
        (e.g. retention's decays), which skips the check's device synchronisation.

    Example:
        >>> import os; os.environ.setdefault("TRITON_INTERPRET", "1")  # doctest: +SKIP
        >>> x = torch.randn(1, 5, 2, 4)
        >>> y, final = plstm_sequence_triton(x, x, x, *(torch.rand(1, 5, 2) for _ in range(4)))  # doctest: +SKIP
    """
    if not _HAVE_TRITON:
        raise RuntimeError("backend='triton' needs the triton package (pip install 'plstm-graph[triton]')")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"backend='triton' takes float32/bfloat16/float16 inputs; {name} is {t.dtype}")
    _blocks(q.shape[-1], v.shape[-1])
    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (set before importing triton)")
    if strategy not in ("auto", "chunk", "scan"):
        raise ValueError(f"strategy must be 'auto', 'chunk' or 'scan', got {strategy!r}")
    if strategy != "scan":
        from . import sequence_chunk as _kc

        if _kc.chunk_supported(q, k, v, source, transition, mark, direct, initial_state, cu_seqlens,
                               transitions_positive=transitions_positive):
            return _kc.plstm_sequence_chunk_triton(q, k, v, source, transition, mark, direct,
                                                   initial_state=initial_state, chunk_size=chunk_size)
        if strategy == "chunk":
            raise ValueError(
                "strategy='chunk' needs every transition > 0, no cu_seqlens and q/k/v of one dtype; use "
                "strategy='auto' to fall back to the recurrent scan"
            )
    return _SeqScan.apply(q, k, v, source, transition, mark, direct, initial_state, cu_seqlens, int(chunk_size))


@torch.no_grad()
def plstm_sequence_step_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    source: torch.Tensor,
    transition: torch.Tensor,
    mark: torch.Tensor,
    direct: torch.Tensor,
    state: Optional[torch.Tensor],
    out_state: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One fused decoding step (one launch; no autograd), same contract as ``plstm_sequence_step``:
    ``y = mark * (q^T C) + direct * (q . k) * v`` and ``C' = transition * C + source * (k outer v)``.

    Shapes:
        q, k ``[B, H, K]``; v ``[B, H, V]``; gates ``[B, H]``; state ``[B, H, K, V]`` float32 or None (zeros).
        Returns ``(y [B, H, V] in v's dtype, new_state [B, H, K, V] float32)``. ``out_state`` may be
        ``state`` itself (in-place update: each program reads its tile before writing it).
    """
    B, H, K = q.shape
    V = v.shape[-1]
    bk, bv, warps = _blocks(K, V)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    gates = [g.contiguous() for g in (source, transition, mark, direct)]
    if state is not None:
        state = state.contiguous()
        if state.dtype != torch.float32:
            raise ValueError(f"state must be float32, got {state.dtype}")
    if out_state is None:
        out_state = torch.empty(B, H, K, V, dtype=torch.float32, device=q.device)
    y = torch.empty(B, H, V, dtype=v.dtype, device=v.device)
    _jit(_seq_step)[(B, H, -(-V // bv))](
        q, k, v, *gates, state if state is not None else out_state, y, out_state, H,
        K=K, V=V, BK=bk, BV=bv, HAS_STATE=state is not None, num_warps=warps,
    )
    return y, out_state
