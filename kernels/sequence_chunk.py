"""Chunkwise Triton kernels of the pLSTM sequence operator (SPEC section 4) for positive transitions
(RetNet retention, gated retention): tensor-core matmuls inside chunks, a state pass across chunks.

Within a chunk of length ``BT`` entered with state ``C^-`` and ``b_t = sum_{i <= t in chunk} log tau_i``
(so every ``tau_i`` must be > 0):

    y_t   = m_t e^{b_{t-1}} q_t^T C^-  +  sum_{j<t} m_t e^{b_{t-1} - b_j} s_j (q_t . k_j) v_j  +  d_t (q_t . k_t) v_t
    C_end = e^{b_last} C^-  +  sum_j e^{b_last - b_j} s_j k_j v_j^T

Write ``S = (Q K^T) o M`` with ``M_tj = m_t e^{b_{t-1}-b_j} s_j`` (j < t), ``M_tt = d_t``, ``a_t = m_t e^{b_{t-1}}``,
``w_j = s_j e^{b_last - b_j}``; then ``Y = S V + diag(a) Q C^-``. Four kernels:

1. ``_fwd_h``  (program per (K-block x V-block, b*h, segment)): walks the chunks, stores each chunk's entering
   state ``C^-`` (``[B, NT, H, K, V]``; float32, or the input dtype for 16-bit inputs without gate gradients:
   :func:`_state_dtype`) and the final state (float32); ``C <- e^{b_last} C + (K o w)^T V`` with
   ``tl.dot``. On long, narrow inputs (T = 32k, B = 1: 32 programs walking 512 chunks) the chunks are cut into
   ``S`` segments of ``L`` chunks walked in parallel from zero states (:func:`segment_chunks`); ``_carry``
   then walks the ``S`` segment states, and the consumers (2, 4) add the carried state decayed to the chunk,
   ``C^- = C_local^- + e^{coff} carry[segment]``. Pass 3 is cut the same way.
2. ``_fwd_o``  (program per (V-block, chunk, b*h)): ``Y = S V + diag(a) Q C^-``, all chunks in parallel.
3. ``_bwd_dh`` (program per (V-block, b*h)): the adjoint state pass, chunks backwards:
   ``G^- = e^{b_last} G + (Q o a)^T dY`` from ``G = d final_state``; stores each chunk's leaving adjoint and
   ``d initial_state``.
4. ``_bwd_dqkv`` (program per (chunk, b*h), looping over V-blocks; the state passes 1 and 3 also split K):
   ``dV = S^T dY + diag(w) K G``,  ``dS = (dY V^T) o M``,  ``dQ = dS K + diag(a) dY C^-^T``,
   ``dK = dS^T Q + diag(w) V G^T``.

Gate gradients (when a gate requires grad) come from the same program: with ``P = (dY V^T) o (Q K^T)``
(summed over V-blocks), ``E_tj = e^{b_{t-1}-b_j}`` (j < t), ``qc_t = q_t^T C^- dy_t``, ``kg_j = k_j^T G v_j``:
``dd_t = P_tt``, ``dm_t = sum_j P_tj E_tj s_j + e^{b_{t-1}} qc_t``, ``ds_j = sum_t P_tj m_t E_tj + e^{b_last-b_j} kg_j``
and ``d log tau`` from the gradients of ``b_{t-1}``, ``b_j`` and ``b_last`` (incl. ``e^{b_last} <C^-, G>``) by a
reverse cumulative sum. The dispatcher in ``kernels/sequence.py`` sends packed ``cu_seqlens`` and
non-positive transitions to the recurrent scan. Gates given as one value per head (zero strides over B and T,
as retention passes them) are read as ``[H]`` vectors (``GSB = GST = 0``), never copied to ``[B, T, H]``. ``T``
and the chunk count are runtime
arguments; only head dims, block sizes and dtype-derived flags are compile-time constants.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from ._common import bind_triton as _bind_triton
from ._common import next_pow2 as _pow2
from ._common import Tuned as _Tuned

triton = None
tl = None


def _import_triton():
    return _bind_triton(globals())


_JITTED = {}
_HELPERS = ("_gate_chunk", "_mask_matrix", "_dot", "_tile")


def _trips(n: int):
    """The trip count of a kernel's counted loop (argument ``TRIPS``, equal to ``L`` or ``S``). A separate argument
    because the CPU interpreter hands int arguments over as 1-element arrays that its ``range()`` cannot take (with
    numpy >= 2); a numpy integer passes through unconverted there. On the GPU it is a plain runtime int."""
    if _interpreting():
        import numpy

        return numpy.int64(n)
    return n


def _jit(fn):
    """``triton.jit(fn)`` on first call, per interpreter mode (so ``TRITON_INTERPRET`` set after import counts);
    the device helpers the kernels call are jitted for the same mode and bound as module globals."""
    mode = os.environ.get("TRITON_INTERPRET") == "1"
    jit = _import_triton().jit
    for name in _HELPERS:
        hk = (name, mode)
        if hk not in _JITTED:
            _JITTED[hk] = jit(globals()[name + "_py"])
        globals()[name] = _JITTED[hk]
    key = (fn.__name__, mode)
    kern = _JITTED.get(key)
    if kern is None:
        names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
        kern = jit(do_not_specialize=[n for n in ("T", "GSB", "NT", "L", "S", "TRIPS") if n in names])(fn)
        if not mode:  # GPU: warps/stages per compiled variant (constexprs, dtypes; never per T); kernels only store
            kern = _Tuned(kern, [(w, st) for w in (4, 8) for st in (1, 2, 3)])
        _JITTED[key] = kern
    return kern


MAX_HEAD_DIM = 256


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _dot_py(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot`` with float32 accumulation. UPCAST (CPU interpreter only): float32 operands, because the
    triton 3.6 interpreter returns garbage for bf16 x bf16 -> fp32 dots; the operands were already rounded to
    the input dtype, so the interpreter still sees the GPU's rounding."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


def _tile_py(base, R, C, sr, sc, r0, c0, BR: tl.constexpr, BC: tl.constexpr):
    """Pointers and mask of the ``[BR, BC]`` tile at ``(r0, c0)`` of the ``R x C`` matrix at ``base`` with strides
    ``(sr, sc)``: element ``(i, j)`` at ``base + (r0 + i) * sr + (c0 + j) * sc``, masked outside the matrix (loads
    use ``other=0``). Plain pointer arithmetic, so the kernels run on every triton >= 3.0 (3.9 removed block
    pointers); offsets in int64."""
    ri = r0 + tl.arange(0, BR)
    ci = c0 + tl.arange(0, BC)
    ptrs = base + ri.to(tl.int64)[:, None] * sr + ci.to(tl.int64)[None, :] * sc
    return ptrs, (ri[:, None] < R) & (ci[None, :] < C)


def _gate_chunk_py(ptr, g0, t0, T, GST, BT: tl.constexpr, other):
    """Load one chunk of a gate as float32 [BT] (``g0 = b * GSB + h``, time stride ``GST``: ``T*H, H`` for
    [B, T, H] gates, ``0, 0`` for per-head [H] ones); padded tokens get ``other``."""
    offt = t0 + tl.arange(0, BT)
    return tl.load(ptr + g0 + offt.to(tl.int64) * GST, mask=offt < T, other=other).to(tl.float32)


def _fwd_h(k, v, src, lg, h0, hs, hseg, T, H, GSB, GST, NT, L, TRIPS,
           K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
           HAS_H0: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Program per (K-block x V-block, b*h, segment of ``L`` chunks): the state pass over one segment, started
    from zero (from ``h0`` in segment 0); stores each chunk's entering *local* state and the segment's
    leaving local state ``hseg [B, S, H, K, V]``. ``_carry`` adds what earlier segments pass in."""
    kb = tl.program_id(0) // tl.cdiv(V, BV)
    vb = tl.program_id(0) % tl.cdiv(V, BV)
    bh = tl.program_id(1).to(tl.int64)
    seg = tl.program_id(2)
    nseg = tl.num_programs(2)
    b = bh // H
    h = bh % H
    row0 = b * T * H + h  # [B, T, H] offset of (b, 0, h)
    grow = b * GSB + h  # gate offset of (b, 0, h)
    kbase = k + row0 * K
    vbase = v + row0 * V
    c = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        if seg == 0:
            p0, p0_m = _tile(h0 + bh * K * V, K, V, V, 1, kb * BK, vb * BV, BK, BV)
            c += tl.load(p0, mask=p0_m, other=0.0).to(tl.float32)
    # a counted loop of L chunks (NT = S * L, the last segment padded with empty chunks past T that leave the
    # state unchanged): triton's pipeliner can prefetch the next chunk's k and v (num_stages)
    for i in range(0, TRIPS):
        ci = seg * L + i
        t0 = ci * BT
        ph, ph_m = _tile(hs + ((b * NT + ci) * H + h) * K * V, K, V, V, 1, kb * BK, vb * BV, BK, BV)
        tl.store(ph, c.to(hs.dtype.element_ty), mask=ph_m)
        g = _gate_chunk(lg, grow, t0, T, GST, BT, 0.0)
        s = _gate_chunk(src, grow, t0, T, GST, BT, 0.0)
        bc = tl.cumsum(g, axis=0)
        blast = tl.sum(g, axis=0)
        w = s * tl.exp(blast - bc)
        pk, pk_m = _tile(kbase, K, T, 1, H * K, kb * BK, t0, BK, BT)
        pv, pv_m = _tile(vbase, T, V, H * V, 1, t0, vb * BV, BT, BV)
        kt = tl.load(pk, mask=pk_m, other=0.0)
        vv = tl.load(pv, mask=pv_m, other=0.0)
        c = c * tl.exp(blast) + _dot((kt * w[None, :]).to(vv.dtype), vv, PREC, UPCAST)
    pT, pT_m = _tile(hseg + ((b * nseg + seg) * H + h) * K * V, K, V, V, 1, kb * BK, vb * BV, BK, BV)
    tl.store(pT, c, mask=pT_m)


def _carry(xseg, seglg, carry, final, H, S, TRIPS, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
           BV: tl.constexpr, REVERSE: tl.constexpr):
    """Program per (K-block x V-block, b*h): the short pass over segments. Forward: ``carry[s]`` = the state
    entering segment ``s`` from earlier segments, ``c <- e^{seglg[s]} c + xseg[s]``; ``final`` = the state
    leaving the last one. REVERSE: the same from the last segment down (adjoints; ``final`` = d initial)."""
    kb = tl.program_id(0) // tl.cdiv(V, BV)
    vb = tl.program_id(0) % tl.cdiv(V, BV)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    c = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(0, TRIPS):  # TRIPS = S
        s = S - 1 - i if REVERSE else i
        off = ((b * S + s) * H + h) * K * V
        pc, pc_m = _tile(carry + off, K, V, V, 1, kb * BK, vb * BV, BK, BV)
        tl.store(pc, c, mask=pc_m)
        px, px_m = _tile(xseg + off, K, V, V, 1, kb * BK, vb * BV, BK, BV)
        decay = tl.exp(tl.load(seglg + (b * S + s) * H + h))
        c = c * decay + tl.load(px, mask=px_m, other=0.0)
    pf, pf_m = _tile(final + bh * K * V, K, V, V, 1, kb * BK, vb * BV, BK, BV)
    tl.store(pf, c, mask=pf_m)


def _mask_matrix_py(lg, src, mrk, dirc, g0, t0, T, GST, BT: tl.constexpr):
    """Gating of one chunk: M [BT, BT] (M_tj = m_t e^{b_{t-1}-b_j} s_j for j < t, M_tt = d_t, else 0),
    a_t = m_t e^{b_{t-1}} and w_j = s_j e^{b_last - b_j} (float32)."""
    g = _gate_chunk(lg, g0, t0, T, GST, BT, 0.0)
    s = _gate_chunk(src, g0, t0, T, GST, BT, 0.0)
    m = _gate_chunk(mrk, g0, t0, T, GST, BT, 0.0)
    d = _gate_chunk(dirc, g0, t0, T, GST, BT, 0.0)
    bc = tl.cumsum(g, axis=0)
    bp = bc - g
    blast = tl.sum(g, axis=0)
    i = tl.arange(0, BT)
    lower = i[:, None] > i[None, :]
    expo = tl.where(lower, bp[:, None] - bc[None, :], 0.0)
    mm = tl.where(lower, tl.exp(expo) * (m[:, None] * s[None, :]), 0.0)
    mm = tl.where(i[:, None] == i[None, :], d[:, None], mm)
    return mm, m * tl.exp(bp), s * tl.exp(blast - bc)


def _fwd_o(q, k, v, src, lg, mrk, dirc, hs, carry, coff, y, T, H, GSB, GST, NT, L,
           K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
           SEG: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    vb = tl.program_id(0)
    ci = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // H
    h = bh % H
    row0 = b * T * H + h
    t0 = ci * BT
    mm, a, _ = _mask_matrix(lg, src, mrk, dirc, b * GSB + h, t0, T, GST, BT)
    pq, pq_m = _tile(q + row0 * K, T, K, H * K, 1, t0, 0, BT, BK)
    pk, pk_m = _tile(k + row0 * K, T, K, H * K, 1, t0, 0, BT, BK)
    pv, pv_m = _tile(v + row0 * V, T, V, H * V, 1, t0, vb * BV, BT, BV)
    ph, ph_m = _tile(hs + ((b * NT + ci) * H + h) * K * V, K, V, V, 1, 0, vb * BV, BK, BV)
    qq = tl.load(pq, mask=pq_m, other=0.0)
    kk = tl.load(pk, mask=pk_m, other=0.0)
    vv = tl.load(pv, mask=pv_m, other=0.0)
    c = tl.load(ph, mask=ph_m, other=0.0)
    if SEG:  # entering state = local state + what earlier segments pass in, decayed to this chunk
        seg = ci // L
        pc, pc_m = _tile(carry + ((b * tl.cdiv(NT, L) + seg) * H + h) * K * V, K, V, V, 1, 0, vb * BV, BK, BV)
        c = c.to(tl.float32) + tl.exp(tl.load(coff + (b * NT + ci) * H + h)) * tl.load(pc, mask=pc_m, other=0.0)
    sc = _dot(qq, tl.trans(kk), PREC, UPCAST) * mm
    out = _dot(sc.to(vv.dtype), vv, PREC, UPCAST)
    out += a[:, None] * _dot(qq, c.to(qq.dtype), PREC, UPCAST)
    py, py_m = _tile(y + row0 * V, T, V, H * V, 1, t0, vb * BV, BT, BV)
    tl.store(py, out.to(y.dtype.element_ty), mask=py_m)


def _bwd_dh(q, dy, lg, mrk, dhT, dhs, gseg, T, H, GSB, GST, NT, L, TRIPS,
            K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
            HAS_DHT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """The adjoint state pass over one segment (chunks backwards), started from zero (from ``dhT`` in the
    last segment); stores each chunk's leaving *local* adjoint and the local adjoint entering the segment."""
    kb = tl.program_id(0) // tl.cdiv(V, BV)
    vb = tl.program_id(0) % tl.cdiv(V, BV)
    bh = tl.program_id(1).to(tl.int64)
    seg = tl.program_id(2)
    nseg = tl.num_programs(2)
    b = bh // H
    h = bh % H
    row0 = b * T * H + h
    gs = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        if seg == nseg - 1:
            pT, pT_m = _tile(dhT + bh * K * V, K, V, V, 1, kb * BK, vb * BV, BK, BV)
            gs += tl.load(pT, mask=pT_m, other=0.0).to(tl.float32)
    for i in range(0, TRIPS):  # chunks backwards, a counted loop over the padded segment (see _fwd_h)
        ci = seg * L + L - 1 - i
        t0 = ci * BT
        ph, ph_m = _tile(dhs + ((b * NT + ci) * H + h) * K * V, K, V, V, 1, kb * BK, vb * BV, BK, BV)
        tl.store(ph, gs.to(dhs.dtype.element_ty), mask=ph_m)
        g = _gate_chunk(lg, b * GSB + h, t0, T, GST, BT, 0.0)
        m = _gate_chunk(mrk, b * GSB + h, t0, T, GST, BT, 0.0)
        bc = tl.cumsum(g, axis=0)
        a = m * tl.exp(bc - g)
        blast = tl.sum(g, axis=0)
        pq, pq_m = _tile(q + row0 * K, K, T, 1, H * K, kb * BK, t0, BK, BT)
        pd, pd_m = _tile(dy + row0 * V, T, V, H * V, 1, t0, vb * BV, BT, BV)
        qt = tl.load(pq, mask=pq_m, other=0.0)
        dd = tl.load(pd, mask=pd_m, other=0.0)
        gs = gs * tl.exp(blast) + _dot((qt * a[None, :]).to(dd.dtype), dd, PREC, UPCAST)
    p0, p0_m = _tile(gseg + ((b * nseg + seg) * H + h) * K * V, K, V, V, 1, kb * BK, vb * BV, BK, BV)
    tl.store(p0, gs, mask=p0_m)


def _bwd_dqkv(q, k, v, src, lg, mrk, dirc, hs, dhs, carry, coff, gcarry, goff, dy, dq, dk, dv, dsrc, dlg, dmrk,
              ddir, T, H, GSB, GST, NT, L,
              K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
              SEG: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, GATE_GRAD: tl.constexpr):
    ci = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    row0 = b * T * H + h
    t0 = ci * BT
    mm, a, w = _mask_matrix(lg, src, mrk, dirc, b * GSB + h, t0, T, GST, BT)
    pq, pq_m = _tile(q + row0 * K, T, K, H * K, 1, t0, 0, BT, BK)
    pk, pk_m = _tile(k + row0 * K, T, K, H * K, 1, t0, 0, BT, BK)
    qq = tl.load(pq, mask=pq_m, other=0.0)
    kk = tl.load(pk, mask=pk_m, other=0.0)
    qk = _dot(qq, tl.trans(kk), PREC, UPCAST)
    st = tl.trans(qk * mm).to(qq.dtype)  # S^T
    gq = tl.zeros([BT, BK], dtype=tl.float32)
    gk = tl.zeros([BT, BK], dtype=tl.float32)
    # gate gradients: dY V^T summed over V-blocks, q_t^T C^- dy_t, k_j^T G v_j and <C^-, G>
    dyv = tl.zeros([BT, BT], dtype=tl.float32)
    qc = tl.zeros([BT], dtype=tl.float32)
    kg = tl.zeros([BT], dtype=tl.float32)
    cg = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)
    hoff = ((b * NT + ci) * H + h) * K * V
    for vb in range(0, tl.cdiv(V, BV)):
        pv, pv_m = _tile(v + row0 * V, T, V, H * V, 1, t0, vb * BV, BT, BV)
        pd, pd_m = _tile(dy + row0 * V, T, V, H * V, 1, t0, vb * BV, BT, BV)
        ph, ph_m = _tile(hs + hoff, V, K, 1, V, vb * BV, 0, BV, BK)   # C^-^T
        pg, pg_m = _tile(dhs + hoff, K, V, V, 1, 0, vb * BV, BK, BV)  # G
        vv = tl.load(pv, mask=pv_m, other=0.0)
        dd = tl.load(pd, mask=pd_m, other=0.0)
        ct = tl.load(ph, mask=ph_m, other=0.0)
        gg = tl.load(pg, mask=pg_m, other=0.0)
        if SEG:  # local states + the segment carries, decayed to this chunk (see _fwd_o)
            soff = ((b * tl.cdiv(NT, L) + ci // L) * H + h) * K * V
            pct, pct_m = _tile(carry + soff, V, K, 1, V, vb * BV, 0, BV, BK)
            pgc, pgc_m = _tile(gcarry + soff, K, V, V, 1, 0, vb * BV, BK, BV)
            ct = ct.to(tl.float32) + tl.exp(tl.load(coff + (b * NT + ci) * H + h)) * tl.load(pct, mask=pct_m, other=0.0)
            gg = gg.to(tl.float32) + tl.exp(tl.load(goff + (b * NT + ci) * H + h)) * tl.load(pgc, mask=pgc_m, other=0.0)
        gv = _dot(st, dd.to(qq.dtype), PREC, UPCAST)
        kgv = _dot(kk, gg.to(kk.dtype), PREC, UPCAST)
        gv += w[:, None] * kgv
        pdv, pdv_m = _tile(dv + row0 * V, T, V, H * V, 1, t0, vb * BV, BT, BV)
        tl.store(pdv, gv.to(dv.dtype.element_ty), mask=pdv_m)
        dvt = _dot(dd, tl.trans(vv), PREC, UPCAST)
        ds = dvt * mm
        if GATE_GRAD:
            dyv += dvt
            qcv = _dot(qq, tl.trans(ct).to(qq.dtype), PREC, UPCAST)
            qc += tl.sum(qcv * dd.to(tl.float32), axis=1)
            kg += tl.sum(kgv * vv.to(tl.float32), axis=1)
            cg += tl.sum(tl.sum(tl.trans(ct).to(tl.float32) * gg.to(tl.float32), axis=1), axis=0)
        gq += _dot(ds.to(qq.dtype), kk, PREC, UPCAST)
        gq += a[:, None] * _dot(dd, ct.to(dd.dtype), PREC, UPCAST)
        gk += _dot(tl.trans(ds).to(qq.dtype), qq, PREC, UPCAST)
        gk += w[:, None] * _dot(vv, tl.trans(gg).to(vv.dtype), PREC, UPCAST)
    pdq, pdq_m = _tile(dq + row0 * K, T, K, H * K, 1, t0, 0, BT, BK)
    pdk, pdk_m = _tile(dk + row0 * K, T, K, H * K, 1, t0, 0, BT, BK)
    tl.store(pdq, gq.to(dq.dtype.element_ty), mask=pdq_m)
    tl.store(pdk, gk.to(dk.dtype.element_ty), mask=pdk_m)
    if GATE_GRAD:
        g = _gate_chunk(lg, b * GSB + h, t0, T, GST, BT, 0.0)
        sg = _gate_chunk(src, b * GSB + h, t0, T, GST, BT, 0.0)
        mg = _gate_chunk(mrk, b * GSB + h, t0, T, GST, BT, 0.0)
        bc = tl.cumsum(g, axis=0)
        bp = bc - g
        blast = tl.sum(g, axis=0)
        i = tl.arange(0, BT)
        lower = i[:, None] > i[None, :]
        e = tl.where(lower, tl.exp(tl.where(lower, bp[:, None] - bc[None, :], 0.0)), 0.0)
        pp = dyv * qk  # dL/dM (every entry)
        r = pp * e * (mg[:, None] * sg[None, :])  # dL/d(exponent) of the strict lower part
        ebp = tl.exp(bp)
        ew = tl.exp(blast - bc)
        g_d = tl.sum(tl.where(i[:, None] == i[None, :], pp, 0.0), axis=1)
        g_m = tl.sum(pp * e * sg[None, :], axis=1) + ebp * qc
        g_s = tl.sum(pp * e * mg[:, None], axis=0) + ew * kg
        d_bp = tl.sum(r, axis=1) + mg * ebp * qc
        d_bc = d_bp - tl.sum(r, axis=0) - sg * ew * kg
        d_blast = tl.sum(sg * ew * kg, axis=0) + tl.exp(blast) * cg
        g_g = tl.cumsum(d_bc, axis=0, reverse=True) - d_bp + d_blast
        offt = t0 + i
        msk = offt < T
        goff = row0 + offt.to(tl.int64) * H
        tl.store(ddir + goff, g_d, mask=msk)
        tl.store(dmrk + goff, g_m, mask=msk)
        tl.store(dsrc + goff, g_s, mask=msk)
        tl.store(dlg + goff, g_g, mask=msk)


def chunk_size_for(chunk_size: int, K: int) -> int:
    """The kernel chunk length: ``chunk_size`` rounded to a power of two in [16, 64] (32 for K > 128)."""
    bt = min(64, max(16, _pow2(chunk_size)))
    return min(bt, 32) if K > 128 else bt


def _blocks(K: int, V: int):
    bk = max(16, _pow2(K))
    bv = max(16, min(_pow2(V), 64))
    return bk, bv


def _prec(dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _state_dtype(dtype, gate_grad: bool):
    """dtype of the stored per-chunk states ``hs`` and adjoints ``dhs``: the input dtype for 16-bit inputs
    without gate gradients (their only consumers are tensor-core dots that round them to that dtype anyway, so
    outputs and q/k/v gradients are unchanged while the state traffic halves; with segments the local part is
    rounded before the carried part is added, one extra rounding), else float32 (the gate
    gradients read ``<C^-, G>`` and ``q^T C^- dy`` in float32). The recurrences themselves and the final state
    stay float32 either way."""
    return dtype if dtype in (torch.bfloat16, torch.float16) and not gate_grad else torch.float32


SEGMENT_TARGET_PROGRAMS = 512  # segments are cut to bring a state pass to about this many programs ...
SEGMENT_MIN_PROGRAMS = 256  # ... but only when it has fewer than this many without them


def segment_chunks(nt: int, programs: int, segment: Optional[int] = None) -> int:
    """Chunks per segment ``L`` of the state passes. A pass walks ``nt`` chunks one after another in each of
    ``programs`` programs; long, narrow inputs (T = 32k, B = 1) leave most of the GPU idle, so the chunks are
    cut into segments walked in parallel (from zero states) and a short pass over segments (:func:`_carry`)
    adds what each segment receives; the consumers add it back, decayed, when they read a chunk's state.
    ``segment`` forces ``L`` (tests); default: no segments when the pass already has >= 256 programs, else
    enough segments for ~512 programs, at least 8 chunks each. Measured on an H200 (bf16, fwd+bwd of
    retention): (4, 8192, 8, 128, 256), 256 programs: 2.66-2.81 ms unsegmented vs 3.07-3.46 ms cut into
    2-8 segments; (1, 32768, 8, 128, 128), 32 programs: 2.38-2.93 ms in 16 segments vs 4.0 ms unsegmented."""
    if segment is not None:
        return max(1, min(int(segment), nt))
    if programs >= SEGMENT_MIN_PROGRAMS:
        return nt
    nseg = min(max(1, nt // 8), -(-SEGMENT_TARGET_PROGRAMS // programs))
    return -(-nt // max(1, nseg))


def _segment_offsets(lg, bt, nt, L):
    """Per-chunk log decays for the segment fix-ups, from ``lg [B, T, H]`` (log transitions, float32):
    ``seglg [B, S, H]`` (whole segments), ``coff [B, S*L, H]`` (segment start -> chunk start) and
    ``goff [B, S*L, H]`` (chunk end -> segment end); chunks past ``nt`` (padding of the last segment) decay by 1."""
    B, T, H = lg.shape
    S = -(-nt // L)
    chunk = torch.nn.functional.pad(lg, (0, 0, 0, nt * bt - T)).reshape(B, nt, bt, H).sum(2)
    chunk = torch.nn.functional.pad(chunk, (0, 0, 0, S * L - nt)).reshape(B, S, L, H)
    incl = chunk.cumsum(2)
    seglg = incl[:, :, -1]
    coff = (incl - chunk).reshape(B, S * L, H).contiguous()
    goff = (seglg[:, :, None] - incl).reshape(B, S * L, H).contiguous()
    return seglg.contiguous(), coff, goff


class _SeqChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, source, transition, mark, direct, initial_state, chunk_size, segment):
        B, T, H, K = q.shape
        V = v.shape[-1]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        f32 = dict(dtype=torch.float32, device=q.device)
        gates = (source, transition, mark, direct)
        if all(g.stride(0) == 0 and g.stride(1) == 0 for g in gates):  # one value per head (retention's gates)
            gates = [g[0, 0] for g in gates]  # read as [H] with zero batch and time strides: no [B, T, H] copies
            gsb = gst = 0
        else:
            gsb, gst = T * H, H
        src, mrk, dirc = (g.to(torch.float32).contiguous() for g in (gates[0], gates[2], gates[3]))
        lg = torch.log(gates[1].to(torch.float32)).contiguous()
        bt = chunk_size_for(chunk_size, K)
        nt = -(-T // bt)
        bk, bv = _blocks(K, V)
        nvb = -(-V // bv)
        prec = _prec(q.dtype)
        bks = min(bk, 64)  # the state passes split K too: twice the programs on long, narrow batches
        npass = -(-K // bks) * nvb
        L = segment_chunks(nt, npass * B * H, segment)
        S = -(-nt // L)
        ntp = S * L  # chunk count of the state layout: the last segment padded to L chunks (empty, past T)
        hs = torch.empty(B, ntp, H, K, V, dtype=_state_dtype(q.dtype, any(ctx.needs_input_grad[3:7])),
                         device=q.device)
        hseg = torch.empty(B, S, H, K, V, **f32)
        y = torch.empty(B, T, H, V, dtype=v.dtype, device=v.device)
        h0 = initial_state.contiguous() if initial_state is not None else hseg
        _jit(_fwd_h)[(npass, B * H, S)](k, v, src, lg, h0, hs, hseg, T, H, gsb, gst, ntp, L, _trips(L), K=K, V=V, BT=bt,
                                        BK=bks, BV=bv, HAS_H0=initial_state is not None, PREC=prec,
                                        UPCAST=_interpreting())
        if S > 1:
            seglg, coff, goff = _segment_offsets(lg.expand(B, T, H), bt, nt, L)
            carry = torch.empty(B, S, H, K, V, **f32)
            hT = torch.empty(B, H, K, V, **f32)
            _jit(_carry)[(npass, B * H)](hseg, seglg, carry, hT, H, S, _trips(S), K=K, V=V, BK=bks, BV=bv,
                                         REVERSE=False)
        else:
            seglg = coff = goff = carry = lg
            hT = hseg[:, 0]
        _jit(_fwd_o)[(nvb, nt, B * H)](q, k, v, src, lg, mrk, dirc, hs, carry, coff, y, T, H, gsb, gst, ntp, L,
                                       K=K, V=V,
                                       BT=bt, BK=bk, BV=bv, SEG=S > 1, PREC=prec, UPCAST=_interpreting())
        ctx.save_for_backward(q, k, v, src, lg, mrk, dirc, hs, carry, seglg, coff, goff)
        ctx.set_materialize_grads(False)  # an unused final state gets no zero-filled cotangent (None)
        ctx.gate_dtypes = [g.dtype for g in (source, transition, mark, direct)]
        ctx.meta = (bt, L, initial_state is not None, None if initial_state is None else initial_state.dtype, gsb, gst)
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        q, k, v, src, lg, mrk, dirc, hs, carry, seglg, coff, goff = ctx.saved_tensors
        bt, L, has_h0, h0_dtype, gsb, gst = ctx.meta
        B, T, H, K = q.shape
        V = v.shape[-1]
        ntp = hs.shape[1]  # padded chunk count of the state layout (S * L)
        nt = -(-T // bt)
        S = ntp // L
        bk, bv = _blocks(K, V)
        nvb = -(-V // bv)
        prec = _prec(q.dtype)
        f32 = dict(dtype=torch.float32, device=q.device)
        dy = (dy if dy is not None else torch.zeros_like(v)).to(v.dtype).contiguous()
        dhs = torch.empty(B, ntp, H, K, V, dtype=hs.dtype, device=q.device)
        gseg = torch.empty(B, S, H, K, V, **f32)
        dhT_ = dhT.float().contiguous() if dhT is not None else gseg
        bks = min(bk, 64)
        npass = -(-K // bks) * nvb
        _jit(_bwd_dh)[(npass, B * H, S)](q, dy, lg, mrk, dhT_, dhs, gseg, T, H, gsb, gst, ntp, L, _trips(L), K=K,
                                         V=V, BT=bt,
                                         BK=bks, BV=bv, HAS_DHT=dhT is not None, PREC=prec, UPCAST=_interpreting())
        if S > 1:
            gcarry = torch.empty(B, S, H, K, V, **f32)
            dh0 = torch.empty(B, H, K, V, **f32)
            _jit(_carry)[(npass, B * H)](gseg, seglg, gcarry, dh0, H, S, _trips(S), K=K, V=V, BK=bks, BV=bv,
                                         REVERSE=True)
        else:
            gcarry = carry
            dh0 = gseg[:, 0]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        gate_grad = any(ctx.needs_input_grad[3:7])
        gbuf = [torch.empty(B, T, H, **f32) for _ in range(4)] if gate_grad else [dq] * 4
        _jit(_bwd_dqkv)[(nt, B * H)](q, k, v, src, lg, mrk, dirc, hs, dhs, carry, coff, gcarry, goff, dy, dq, dk,
                                     dv, *gbuf, T, H, gsb, gst, ntp, L, K=K, V=V, BT=bt, BK=bk, BV=bv, SEG=S > 1,
                                     PREC=prec, UPCAST=_interpreting(), GATE_GRAD=gate_grad)
        gates = [None] * 4
        if gate_grad:
            d_src, d_lg, d_mrk, d_dir = gbuf
            gates = [d_src, d_lg / torch.exp(lg), d_mrk, d_dir]  # d tau = d log(tau) / tau
            gates = [gr.to(dt) if need else None
                     for gr, dt, need in zip(gates, ctx.gate_dtypes, ctx.needs_input_grad[3:7])]
        return dq, dk, dv, *gates, (dh0.to(h0_dtype) if has_h0 else None), None, None


def chunk_supported(q, k, v, source, transition, mark, direct, initial_state, cu_seqlens,
                    transitions_positive: bool = False) -> bool:
    """True when the chunkwise kernels apply: no packing, q/k/v of one float dtype, head dims <= 256,
    every transition > 0 (a device sync on the transition tensor, skipped when the caller passes
    ``transitions_positive=True``)."""
    if cu_seqlens is not None or not (q.dtype == k.dtype == v.dtype):
        return False
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    B, T, H, K = q.shape
    if K > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM or T == 0 or B == 0:
        return False
    if B * H > 65535 or -(-T // chunk_size_for(16, K)) > 65535:  # CUDA grid y/z limits of the launches
        return False
    return transitions_positive or bool((transition > 0).all())


def plstm_sequence_chunk_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    source: torch.Tensor,
    transition: torch.Tensor,
    mark: torch.Tensor,
    direct: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
    segment: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise Triton pLSTM sequence operator for positive transitions; differentiable in every input
    (q, k, v, the four gates, initial_state). Check :func:`chunk_supported` first.

    Shapes:
        q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; gates ``[B, T, H]`` (transition > 0); initial_state
        ``[B, H, K, V]`` or None. Returns ``y [B, T, H, V]`` in ``v``'s dtype and ``final_state [B, H, K, V]``
        float32.

    Example:
        >>> import os; os.environ.setdefault("TRITON_INTERPRET", "1")  # doctest: +SKIP
        >>> x = torch.randn(1, 20, 2, 16)
        >>> g = torch.rand(1, 20, 2) + 0.5
        >>> y, final = plstm_sequence_chunk_triton(x, x, x, g, g, g, g, chunk_size=16)  # doctest: +SKIP
    """
    return _SeqChunk.apply(q, k, v, source, transition, mark, direct, initial_state, int(chunk_size), segment)
