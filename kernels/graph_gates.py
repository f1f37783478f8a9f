"""Fused gate kernels of the pLSTM graph layer: :meth:`PLSTMGraphLayer._gates
<plstm_graph.nn.PLSTMGraphLayer>` in two launches forward and two backward.

Math (SPEC section 3; the readable form is ``PLSTMGraphLayer._gates``), per head, with ``g = gate_node(x)``
(``[N, H, 8]``), ``e = gate_edge(edge_attr)`` (``[E_in, H, 4]``, row ``r(j)`` for schedule edge ``j``):

    edge j = u -> w:             s_j = g[u,0] + g[w,1] + b_s + e[r(j),0]      S_j = sigmoid(s_j)
                                 m_j = g[w,2] + g[u,3] + b_m + e[r(j),1]      mark_j = sigmoid(m_j)
    line edge l = (a, b),        t_l = g[x,4] + g[u,5] + g[w,6] + b_t + e[r(a),2] + e[r(b),3]
    a = x -> u, b = u -> w:                                                  T_l = tanh(c t_l)
    node n:                      direct_n = sigmoid(g[n,7] + b_d)
    P-mode:                      source_j = S_j / max(1, sum_{tail(j') = u} |S_j'|)
                                 transition_l = T_l / max(1, sum_{l' = (a, .)} |T_l'|)
    (D-mode, or normalize=False: source = S, transition = T.)

Why: the readable form is ~31 kernel launches per layer forward and ~55 backward (a gather per endpoint and
slot, an add per term, a zeros + index_add + gather + divide per normalisation, and their backward); on a
batch of 32 molecules every one of them is a few microseconds of GPU work behind ~20 us of host time, so the
molecule training step was bound by launches (issue #4). Here:

* forward: ``_fwd_kernel`` (one program per block of edges, line edges or nodes: the raw gates, and in
  P-mode the group sums ``sum |S|`` per node and ``sum |T|`` per edge with fp32 atomics), then, in P-mode,
  ``_norm_kernel`` (divide by ``max(1, sum)``);
* backward: in P-mode ``_bwd_reduce_kernel`` (per group ``R = sum dout * out``), then ``_bwd_kernel``:
  ``dS_j = (dsource_j - [sum_u >= 1] sgn(S_j) R_u) / max(1, sum_u)`` (likewise for ``T``), through the
  sigmoid / tanh, and scattered with fp32 atomics to ``dg``, ``de`` and the four bias gradients.

The backward reads only the saved outputs and group sums (``S = source * max(1, sum)``), not ``g`` or ``e``.
Gates are float32 whatever the input dtype (float32, bfloat16 or float16; float64 stays on the readable
path). Atomic sums make the last bits of the group sums and of ``dg`` / ``de`` depend on the order the GPU
runs them in (tests compare against the readable form with a tolerance). Counts are runtime arguments: a new
batch never recompiles.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._common import available
from ._common import bind_triton as _bind_triton
from ._common import jit_kernel as _jit_kernel
from ._common import lazy_jit as _lazy_jit
from ._common import next_pow2 as _pow2

triton = None
tl = None

__all__ = ["available", "graph_gates_triton", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ROWS = 128  # edges / line edges / nodes per program


# counts change with every batch: never specialise on their values (Triton would otherwise compile a variant
# per combination of "== 1" / "divisible by 16" of five counts: a compile every few steps)
_COUNTS = ["N", "E", "L", "nb_e", "nb_l"]


# index arrays: views into a batch's packed buffer (and row 1 of edge_index starts E int64s in), so their
# 16-byte alignment changes with the batch: never specialised on (else a batch could compile a new variant)
_INDEX = ["eid", "tail", "head", "la", "lb"]


_HELPERS = ("_edge_rows", "_unnormalize_grad")


def _bind_helpers():
    """Bind the device helpers, jitted for the current interpreter mode, as module globals (the kernels resolve
    them when they compile); returns triton."""
    tr = _bind_triton(globals())
    for name in _HELPERS:
        globals()[name] = _lazy_jit(globals()[name + "_py"], tr)
    return tr


def _jit(fn):
    """The kernel, jitted on first use, behind a :class:`._common.FastLaunch` (no per-launch binding)."""
    return _jit_kernel(fn, _bind_helpers, free=_COUNTS, no_align=_INDEX)


def _edge_rows_py(eid, r, mr, HAS_EID: tl.constexpr):
    """Rows of the edge pre-activations for schedule edges ``r``: ``eid[r]``, or ``r`` itself."""
    er = r
    if HAS_EID:
        er = tl.load(eid + r, mask=mr, other=0).to(tl.int64)
    return er


def _unnormalize_grad_py(out, dout, tot_ptr, red_ptr, gidx, m2):
    """Backward through the P rule ``out = raw / max(1, tot)``, ``tot = sum_group |raw|``, ``red = sum_group
    dout * out``: returns ``(raw, d raw)`` with ``d raw = (dout - [tot >= 1] sgn(raw) red) / max(1, tot)``."""
    tot = tl.load(tot_ptr + gidx, mask=m2, other=0.0)
    den = tl.maximum(tot, 1.0)
    raw = out * den
    sgn = tl.where(raw > 0.0, 1.0, tl.where(raw < 0.0, -1.0, 0.0))
    red = tl.load(red_ptr + gidx, mask=m2, other=0.0)
    return raw, (dout - tl.where(tot >= 1.0, sgn * red, 0.0)) / den


def _split16(sizes, dtype, device, zero: bool):
    """One allocation cut into parts of ``sizes`` elements, each starting at a multiple of 16 elements (so every
    part is 16-byte aligned whatever the counts: Triton specialises kernels on pointer alignment)."""
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + (n + 15) // 16 * 16)
    buf = (torch.zeros if zero else torch.empty)(max(1, starts[-1]), dtype=dtype, device=device)
    return [buf[o: o + n] for o, n in zip(starts, sizes)]


def _fwd_kernel(g, g_rs, e, e_rs, eid, b_s, b_m, b_t, b_d, tail, head, la, lb,
                src, mark, trans, direct, ntot, etot,
                N, E, L, H, nb_e, nb_l, scale,
                HP: tl.constexpr, BR: tl.constexpr, HAS_E: tl.constexpr, HAS_EID: tl.constexpr,
                NORM: tl.constexpr):
    """Programs ``[0, nb_e)``: edges (source, mark); ``[nb_e, nb_e + nb_l)``: line edges (transition); the
    rest: nodes (direct). Rows of ``BR`` items x ``HP`` heads; ``g`` / ``e`` rows are ``g_rs`` / ``e_rs``
    elements apart (column slices of a wider projection are read in place)."""
    pid = tl.program_id(0)
    offh = tl.arange(0, HP)
    mh = offh < H
    rows = tl.arange(0, BR).to(tl.int64)
    if pid < nb_e:
        r = pid.to(tl.int64) * BR + rows
        mr = r < E
        m2 = mr[:, None] & mh[None, :]
        u = tl.load(tail + r, mask=mr, other=0).to(tl.int64)
        w = tl.load(head + r, mask=mr, other=0).to(tl.int64)
        gu = g + u[:, None] * g_rs + offh[None, :] * 8
        gw = g + w[:, None] * g_rs + offh[None, :] * 8
        s = tl.load(gu, mask=m2, other=0.0).to(tl.float32) + tl.load(gw + 1, mask=m2, other=0.0).to(tl.float32)
        s = s + tl.load(b_s + offh, mask=mh, other=0.0)[None, :]
        m = tl.load(gw + 2, mask=m2, other=0.0).to(tl.float32) + tl.load(gu + 3, mask=m2, other=0.0).to(tl.float32)
        m = m + tl.load(b_m + offh, mask=mh, other=0.0)[None, :]
        if HAS_E:
            er = _edge_rows(eid, r, mr, HAS_EID)
            ep = e + er[:, None] * e_rs + offh[None, :] * 4
            s = s + tl.load(ep, mask=m2, other=0.0).to(tl.float32)
            m = m + tl.load(ep + 1, mask=m2, other=0.0).to(tl.float32)
        sg = tl.sigmoid(s)
        out = r[:, None] * H + offh[None, :]
        tl.store(src + out, sg, mask=m2)
        tl.store(mark + out, tl.sigmoid(m), mask=m2)
        if NORM:
            tl.atomic_add(ntot + u[:, None] * H + offh[None, :], tl.abs(sg), mask=m2)
    elif pid < nb_e + nb_l:
        r = (pid - nb_e).to(tl.int64) * BR + rows
        mr = r < L
        m2 = mr[:, None] & mh[None, :]
        a = tl.load(la + r, mask=mr, other=0).to(tl.int64)
        b = tl.load(lb + r, mask=mr, other=0).to(tl.int64)
        x = tl.load(tail + a, mask=mr, other=0).to(tl.int64)
        u = tl.load(tail + b, mask=mr, other=0).to(tl.int64)
        w = tl.load(head + b, mask=mr, other=0).to(tl.int64)
        t = tl.load(g + x[:, None] * g_rs + offh[None, :] * 8 + 4, mask=m2, other=0.0).to(tl.float32)
        t = t + tl.load(g + u[:, None] * g_rs + offh[None, :] * 8 + 5, mask=m2, other=0.0).to(tl.float32)
        t = t + tl.load(g + w[:, None] * g_rs + offh[None, :] * 8 + 6, mask=m2, other=0.0).to(tl.float32)
        t = t + tl.load(b_t + offh, mask=mh, other=0.0)[None, :]
        if HAS_E:
            ra = _edge_rows(eid, a, mr, HAS_EID)
            rb = _edge_rows(eid, b, mr, HAS_EID)
            t = t + tl.load(e + ra[:, None] * e_rs + offh[None, :] * 4 + 2, mask=m2, other=0.0).to(tl.float32)
            t = t + tl.load(e + rb[:, None] * e_rs + offh[None, :] * 4 + 3, mask=m2, other=0.0).to(tl.float32)
        tt = 2.0 * tl.sigmoid(2.0 * scale * t) - 1.0  # tanh(scale * t)
        tl.store(trans + r[:, None] * H + offh[None, :], tt, mask=m2)
        if NORM:
            tl.atomic_add(etot + a[:, None] * H + offh[None, :], tl.abs(tt), mask=m2)
    else:
        r = (pid - nb_e - nb_l).to(tl.int64) * BR + rows
        mr = r < N
        m2 = mr[:, None] & mh[None, :]
        d = tl.load(g + r[:, None] * g_rs + offh[None, :] * 8 + 7, mask=m2, other=0.0).to(tl.float32)
        d = d + tl.load(b_d + offh, mask=mh, other=0.0)[None, :]
        tl.store(direct + r[:, None] * H + offh[None, :], tl.sigmoid(d), mask=m2)


def _norm_kernel(src, trans, ntot, etot, tail, la, E, L, H, nb_e,
                 HP: tl.constexpr, BR: tl.constexpr):
    """P-mode: ``source_j /= max(1, ntot[tail(j)])`` (programs ``[0, nb_e)``), ``transition_l /=
    max(1, etot[a(l)])`` (the rest)."""
    pid = tl.program_id(0)
    offh = tl.arange(0, HP)
    mh = offh < H
    rows = tl.arange(0, BR).to(tl.int64)
    if pid < nb_e:
        r = pid.to(tl.int64) * BR + rows
        mr = r < E
        grp = tl.load(tail + r, mask=mr, other=0).to(tl.int64)
        vals, tot = src, ntot
    else:
        r = (pid - nb_e).to(tl.int64) * BR + rows
        mr = r < L
        grp = tl.load(la + r, mask=mr, other=0).to(tl.int64)
        vals, tot = trans, etot
    m2 = mr[:, None] & mh[None, :]
    den = tl.maximum(tl.load(tot + grp[:, None] * H + offh[None, :], mask=m2, other=1.0), 1.0)
    p = vals + r[:, None] * H + offh[None, :]
    tl.store(p, tl.load(p, mask=m2, other=0.0) / den, mask=m2)


def _bwd_reduce_kernel(src, trans, dsrc, dtrans, nred, ered, tail, la, E, L, H, nb_e,
                       HP: tl.constexpr, BR: tl.constexpr):
    """P-mode: ``nred[u] = sum_{tail(j) = u} dsource_j source_j``, ``ered[a] = sum_{l = (a, .)}
    dtransition_l transition_l`` (fp32 atomics)."""
    pid = tl.program_id(0)
    offh = tl.arange(0, HP)
    mh = offh < H
    rows = tl.arange(0, BR).to(tl.int64)
    if pid < nb_e:
        r = pid.to(tl.int64) * BR + rows
        mr = r < E
        grp = tl.load(tail + r, mask=mr, other=0).to(tl.int64)
        vals, grads, red = src, dsrc, nred
    else:
        r = (pid - nb_e).to(tl.int64) * BR + rows
        mr = r < L
        grp = tl.load(la + r, mask=mr, other=0).to(tl.int64)
        vals, grads, red = trans, dtrans, ered
    m2 = mr[:, None] & mh[None, :]
    idx = r[:, None] * H + offh[None, :]
    prod = tl.load(vals + idx, mask=m2, other=0.0) * tl.load(grads + idx, mask=m2, other=0.0).to(tl.float32)
    tl.atomic_add(red + grp[:, None] * H + offh[None, :], prod, mask=m2)


def _bwd_kernel(src, mark, trans, direct, dsrc, dmark, dtrans, ddirect, ntot, etot, nred, ered,
                eid, tail, head, la, lb, dg, dg_rs, de, db,
                N, E, L, H, nb_e, nb_l, scale,
                HP: tl.constexpr, BR: tl.constexpr, HAS_E: tl.constexpr, HAS_EID: tl.constexpr,
                NORM: tl.constexpr):
    """Gradients of the pre-activations, scattered to ``dg [N, H, 8]`` (rows ``dg_rs`` elements apart, a column
    slice of a wider gradient is written in place), ``de [E_in, H, 4]`` and ``db [4, H]`` (source, mark,
    transition, direct biases). Same program ranges as :func:`_fwd_kernel`."""
    pid = tl.program_id(0)
    offh = tl.arange(0, HP)
    mh = offh < H
    rows = tl.arange(0, BR).to(tl.int64)
    if pid < nb_e:
        r = pid.to(tl.int64) * BR + rows
        mr = r < E
        m2 = mr[:, None] & mh[None, :]
        u = tl.load(tail + r, mask=mr, other=0).to(tl.int64)
        w = tl.load(head + r, mask=mr, other=0).to(tl.int64)
        idx = r[:, None] * H + offh[None, :]
        out = tl.load(src + idx, mask=m2, other=0.0)
        dout = tl.load(dsrc + idx, mask=m2, other=0.0).to(tl.float32)
        if NORM:  # sg: the raw sigmoid
            sg, dsg = _unnormalize_grad(out, dout, ntot, nred, u[:, None] * H + offh[None, :], m2)
        else:
            sg = out
            dsg = dout
        ds = tl.where(m2, dsg * sg * (1.0 - sg), 0.0)
        mk = tl.load(mark + idx, mask=m2, other=0.0)
        dm = tl.where(m2, tl.load(dmark + idx, mask=m2, other=0.0).to(tl.float32) * mk * (1.0 - mk), 0.0)
        gu = dg + u[:, None] * dg_rs + offh[None, :] * 8
        gw = dg + w[:, None] * dg_rs + offh[None, :] * 8
        tl.atomic_add(gu, ds, mask=m2)
        tl.atomic_add(gw + 1, ds, mask=m2)
        tl.atomic_add(gw + 2, dm, mask=m2)
        tl.atomic_add(gu + 3, dm, mask=m2)
        if HAS_E:
            er = _edge_rows(eid, r, mr, HAS_EID)
            ep = de + er[:, None] * (H * 4) + offh[None, :] * 4
            tl.atomic_add(ep, ds, mask=m2)
            tl.atomic_add(ep + 1, dm, mask=m2)
        tl.atomic_add(db + offh, tl.sum(ds, axis=0), mask=mh)
        tl.atomic_add(db + H + offh, tl.sum(dm, axis=0), mask=mh)
    elif pid < nb_e + nb_l:
        r = (pid - nb_e).to(tl.int64) * BR + rows
        mr = r < L
        m2 = mr[:, None] & mh[None, :]
        a = tl.load(la + r, mask=mr, other=0).to(tl.int64)
        b = tl.load(lb + r, mask=mr, other=0).to(tl.int64)
        x = tl.load(tail + a, mask=mr, other=0).to(tl.int64)
        u = tl.load(tail + b, mask=mr, other=0).to(tl.int64)
        w = tl.load(head + b, mask=mr, other=0).to(tl.int64)
        idx = r[:, None] * H + offh[None, :]
        out = tl.load(trans + idx, mask=m2, other=0.0)
        dout = tl.load(dtrans + idx, mask=m2, other=0.0).to(tl.float32)
        if NORM:  # tt: the raw tanh
            tt, dtt = _unnormalize_grad(out, dout, etot, ered, a[:, None] * H + offh[None, :], m2)
        else:
            tt = out
            dtt = dout
        dt = tl.where(m2, dtt * scale * (1.0 - tt * tt), 0.0)
        tl.atomic_add(dg + x[:, None] * dg_rs + offh[None, :] * 8 + 4, dt, mask=m2)
        tl.atomic_add(dg + u[:, None] * dg_rs + offh[None, :] * 8 + 5, dt, mask=m2)
        tl.atomic_add(dg + w[:, None] * dg_rs + offh[None, :] * 8 + 6, dt, mask=m2)
        if HAS_E:
            ra = _edge_rows(eid, a, mr, HAS_EID)
            rb = _edge_rows(eid, b, mr, HAS_EID)
            tl.atomic_add(de + ra[:, None] * (H * 4) + offh[None, :] * 4 + 2, dt, mask=m2)
            tl.atomic_add(de + rb[:, None] * (H * 4) + offh[None, :] * 4 + 3, dt, mask=m2)
        tl.atomic_add(db + 2 * H + offh, tl.sum(dt, axis=0), mask=mh)
    else:
        r = (pid - nb_e - nb_l).to(tl.int64) * BR + rows
        mr = r < N
        m2 = mr[:, None] & mh[None, :]
        idx = r[:, None] * H + offh[None, :]
        dr = tl.load(direct + idx, mask=m2, other=0.0)
        dd = tl.where(m2, tl.load(ddirect + idx, mask=m2, other=0.0).to(tl.float32) * dr * (1.0 - dr), 0.0)
        tl.store(dg + r[:, None] * dg_rs + offh[None, :] * 8 + 7, dd, mask=m2)
        tl.atomic_add(db + 3 * H + offh, tl.sum(dd, axis=0), mask=mh)


def _blocks(n: int) -> int:
    return (n + _ROWS - 1) // _ROWS


def _rows_view(t: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """``t`` (``[R, C]``) with unit column stride, and its row stride (column slices are read in place)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, t.stride(0)


def _bias_arg(b: torch.Tensor) -> torch.Tensor:
    """A bias as the kernels read it (float32, contiguous; a float32 parameter is passed as it is)."""
    return b if b.dtype == torch.float32 and b.is_contiguous() else b.detach().float().contiguous()


def _gates_forward(g, e, biases, tail, head, la, lb, eid, num_heads, scale, norm):
    """The gate kernels' forward: ``(src [E, H], mark [E, H], trans [L, H], direct [N, H], ntot, etot)`` (float32;
    the last two: the P-mode group sums the backward reads). ``g``, ``e``: row views as :func:`_rows_view`."""
    n, h = g.size(0), num_heads
    ne, nl = tail.numel(), la.numel()
    dev = g.device
    g, g_rs = _rows_view(g)
    has_e = e is not None
    if has_e:
        e, e_rs = _rows_view(e)
    else:
        e, e_rs = g, 0  # never read (HAS_E=False)
    if norm:  # one zeroed allocation: the outputs (written whole) and the group sums (accumulated)
        src, mark, trans, direct, ntot, etot = _split16([ne * h, ne * h, nl * h, n * h, n * h, ne * h],
                                                        torch.float32, dev, zero=True)
    else:
        src, mark, trans, direct, ntot, etot = _split16([ne * h, ne * h, nl * h, n * h, 1, 1], torch.float32,
                                                        dev, zero=False)
    nb_e, nb_l, nb_n = _blocks(ne), _blocks(nl), _blocks(n)
    hp = _pow2(h)
    _jit(_fwd_kernel)[(max(1, nb_e + nb_l + nb_n),)](
        g, g_rs, e, e_rs, eid if eid is not None else tail, *[_bias_arg(b) for b in biases], tail, head, la, lb,
        src, mark, trans, direct, ntot, etot, n, ne, nl, h, nb_e, nb_l, float(scale),
        HP=hp, BR=_ROWS, HAS_E=has_e, HAS_EID=eid is not None, NORM=bool(norm))
    if norm and nb_e + nb_l:
        _jit(_norm_kernel)[(nb_e + nb_l,)](src, trans, ntot, etot, tail, la, ne, nl, h, nb_e, HP=hp, BR=_ROWS)
    src, mark, trans, direct = (t.view(-1, h) for t in (src, mark, trans, direct))
    return src, mark, trans, direct, ntot, etot


def _backward_sizes(n, ne, h, norm, e_rows):
    """Element counts of the zeroed buffers :func:`_gates_backward` uses besides ``dg``: ``de``, ``db`` and the
    P-mode group reductions."""
    return [e_rows * h * 4, 4 * h] + ([n * h, ne * h] if norm else [1, 1])


def _gates_backward(saved, dsrc, dmark, dtrans, ddirect, num_heads, scale, norm, e_rows, has_eid, dg=None,
                    bufs=None):
    """The gate kernels' backward from the float32 gate gradients (``None``: zero): returns ``(dg [N, H * 8], de
    [E_in, H * 4], db [4, H])``, float32 (``de`` without rows when there are no edge pre-activations). ``saved``:
    ``(src, mark, trans, direct, ntot, etot, tail, head, la, lb, eid)`` of the forward (``eid``: any index tensor
    when ``has_eid`` is false); ``e_rows``: rows of the edge pre-activations (0: none). ``dg``: a
    ZEROED ``[N, H * 8]`` float32 view with unit column stride to accumulate into (e.g. columns of a wider
    gradient), else one is allocated; ``bufs``: zeroed float32 buffers of :func:`_backward_sizes` (else
    allocated)."""
    src, mark, trans, direct, ntot, etot, tail, head, la, lb, eid = saved
    n, h = direct.shape
    ne, nl = tail.numel(), la.numel()
    dev = src.device
    grads = [t if t is not None else torch.zeros_like(ref)
             for t, ref in ((dsrc, src), (dmark, mark), (dtrans, trans), (ddirect, direct))]
    dsrc, dmark, dtrans, ddirect = (t.contiguous() for t in grads)
    if bufs is None or dg is None:
        sizes = ([n * h * 8] if dg is None else []) + _backward_sizes(n, ne, h, norm, e_rows)
        bufs = _split16(sizes, torch.float32, dev, zero=True)
        if dg is None:
            dg = bufs.pop(0).view(n, h * 8)
    de, db, nred, ered = bufs
    nb_e, nb_l, nb_n = _blocks(ne), _blocks(nl), _blocks(n)
    hp = _pow2(h)
    if norm and nb_e + nb_l:
        _jit(_bwd_reduce_kernel)[(nb_e + nb_l,)](src, trans, dsrc, dtrans, nred, ered, tail, la, ne, nl, h,
                                                 nb_e, HP=hp, BR=_ROWS)
    _jit(_bwd_kernel)[(max(1, nb_e + nb_l + nb_n),)](
        src, mark, trans, direct, dsrc, dmark, dtrans, ddirect, ntot, etot, nred, ered,
        eid, tail, head, la, lb, dg, dg.stride(0), de if e_rows else dg, db,
        n, ne, nl, h, nb_e, nb_l, float(scale),
        HP=hp, BR=_ROWS, HAS_E=bool(e_rows), HAS_EID=has_eid, NORM=norm)
    return dg, de.view(e_rows, h * 4), db.view(4, h)


class _GraphGates(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, e, b_s, b_m, b_t, b_d, tail, head, la, lb, eid, num_heads, scale, norm):
        out = _gates_forward(g, e, (b_s, b_m, b_t, b_d), tail, head, la, lb, eid, num_heads, scale, norm)
        ctx.save_for_backward(*out, tail, head, la, lb, eid if eid is not None else tail)
        ctx.meta = (num_heads, scale, bool(norm), e.size(0) if e is not None else 0, eid is not None, g.dtype,
                    e.dtype if e is not None else None)
        src, mark, trans, direct = out[:4]
        return src, trans, mark, direct

    @staticmethod
    def backward(ctx, dsrc, dtrans, dmark, ddirect):
        h, scale, norm, e_rows, has_eid, g_dtype, e_dtype = ctx.meta
        dg, de, dbs = _gates_backward(ctx.saved_tensors, dsrc, dmark, dtrans, ddirect, h, scale, norm, e_rows,
                                      has_eid)
        return (dg.to(g_dtype), de.to(e_dtype) if e_dtype is not None else None, dbs[0], dbs[1], dbs[2], dbs[3]) \
            + (None,) * 8


def graph_gates_triton(
    g: torch.Tensor, e: Optional[torch.Tensor], source_bias: torch.Tensor, mark_bias: torch.Tensor,
    transition_bias: torch.Tensor, direct_bias: torch.Tensor, edge_index: torch.Tensor, line_index: torch.Tensor,
    input_edge_ids: Optional[torch.Tensor], num_heads: int, transition_scale: float, normalize: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's gates ``(source [E, H], transition [L, H], mark [E, H], direct [N, H])``, float32.

    Args:
        g: ``[N, H * 8]`` node gate pre-activations (``gate_node(x)``; float32 / bfloat16 / float16; a column
            slice of a wider projection is read in place).
        e: ``[E_in, H * 4]`` edge gate pre-activations (``gate_edge(edge_attr)``) or ``None``; schedule edge
            ``j`` reads row ``input_edge_ids[j]`` (row ``j`` when ``input_edge_ids`` is ``None``).
        *_bias: ``[H]`` gate biases.
        edge_index: ``[2, E]`` schedule edges; line_index: ``[2, L]`` line edges ``(a, b)``, ``head(a) ==
            tail(b)``. Indices must be in range (not checked: a check would sync with the host).
        normalize: P-mode normalisation (sources per tail node, transitions per incoming edge).

    Example (CPU needs ``TRITON_INTERPRET=1``):
        >>> import torch
        >>> ei, li = torch.tensor([[0, 1], [1, 2]]), torch.tensor([[0], [1]])
        >>> b = torch.zeros(2)
        >>> s, t, m, d = graph_gates_triton(torch.zeros(3, 16), None, b, b, b, b, ei, li, None, 2, 5.0, True)
        >>> s.shape, t.shape, d.shape
        (torch.Size([2, 2]), torch.Size([1, 2]), torch.Size([3, 2]))
    """
    if g.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"graph_gates_triton takes {SUPPORTED_DTYPES} pre-activations, got {g.dtype}")
    tail, head = edge_index
    la, lb = line_index
    return _GraphGates.apply(g, e, source_bias, mark_bias, transition_bias, direct_bias, tail.contiguous(),
                             head.contiguous(), la.contiguous(), lb.contiguous(),
                             input_edge_ids.contiguous() if input_edge_ids is not None else None,
                             int(num_heads), float(transition_scale), bool(normalize))
