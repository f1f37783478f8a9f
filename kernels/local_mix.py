"""Fused kernel of the molecule blocks' local bond term: ``h + LocalBondMix(h)`` in one launch forward and one
backward (the readable form is :class:`plstm_graph.nn.blocks.LocalBondMix`).

Math, for every DAG edge ``j = u -> w`` with edge pre-activation ``p_j = W e_{r(j)} + b`` (row ``r(j) =
input_edge_ids[j]`` of the block's edge projection, or ``j``; ``p = 0`` without edge features), messages in both
directions:

    out_n = h_n + sum_{j = u -> n} GELU(h_u + p_j) + sum_{j = n -> w} GELU(h_w + p_j)          (exact, erf GELU)

Backward, ``GELU'(x) = Phi(x) + x phi(x)``:

    dh_n = dout_n + sum_{j = n -> w} dout_w GELU'(h_n + p_j) + sum_{j = u -> n} dout_u GELU'(h_n + p_j)
    dp_j = dout_w GELU'(h_u + p_j) + dout_u GELU'(h_w + p_j)

Why: the readable form is a gather, a concatenation, an add, a GELU, a zero fill, an ``index_add`` and the
residual add (plus two gathers of the edge rows) forward, and about as many backward: per block ~9 launches
forward and ~9 backward, each a few microseconds of GPU work behind ~20 us of host time on a molecule batch.
Here: the residual copy and one kernel each way (fp32 atomics scatter the messages; the last bits of a sum
depend on the order the GPU runs them in). Counts are runtime arguments (no recompiles per batch).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._common import available
from ._common import bind_triton as _bind_triton
from ._common import jit_kernel as _jit_kernel
from ._common import lazy_jit as _lazy_jit
from ._common import next_pow2 as _pow2

triton = None
tl = None

__all__ = ["available", "local_mix_triton"]

_ROWS = 16  # edges per program
_FREE = ["E"]
_INDEX = ["eid", "tail", "head"]  # views into the batch's packed buffer: alignment changes per batch


def _bind_helpers():
    """Bind ``_endpoints`` (jitted for the current interpreter mode) as a module global; returns triton."""
    tr = _bind_triton(globals())
    globals()["_endpoints"] = _lazy_jit(_endpoints_py, tr)
    return tr


def _jit(fn):
    return _jit_kernel(fn, _bind_helpers, free=_FREE, no_align=_INDEX)


def _endpoints_py(h, p, p_rs, eid, tail, head, r, mr, offd, m2, D,
                  HAS_P: tl.constexpr, HAS_EID: tl.constexpr):
    """For edges ``r`` (``j = u -> w``): ``u``, ``w``, the pre-activations of the messages ``u -> w`` (``a = h_u
    + p_j``) and ``w -> u`` (``b = h_w + p_j``) in float32, and the rows ``er`` of ``p``."""
    u = tl.load(tail + r, mask=mr, other=0).to(tl.int64)
    w = tl.load(head + r, mask=mr, other=0).to(tl.int64)
    a = tl.load(h + u[:, None] * D + offd[None, :], mask=m2, other=0.0).to(tl.float32)
    b = tl.load(h + w[:, None] * D + offd[None, :], mask=m2, other=0.0).to(tl.float32)
    er = r
    if HAS_P:
        if HAS_EID:
            er = tl.load(eid + r, mask=mr, other=0).to(tl.int64)
        pe = tl.load(p + er[:, None] * p_rs + offd[None, :], mask=m2, other=0.0).to(tl.float32)
        a = a + pe
        b = b + pe
    return u, w, a, b, er


def _fwd_kernel(h, p, p_rs, eid, tail, head, out, E, D,
                BD: tl.constexpr, BR: tl.constexpr, HAS_P: tl.constexpr, HAS_EID: tl.constexpr,
                RELU: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    mr = r < E
    offd = tl.arange(0, BD)
    m2 = mr[:, None] & (offd < D)[None, :]
    u, w, a, b, er = _endpoints(h, p, p_rs, eid, tail, head, r, mr, offd, m2, D, HAS_P, HAS_EID)
    if RELU:
        ga = tl.maximum(a, 0.0)
        gb = tl.maximum(b, 0.0)
    else:  # exact (erf) GELU
        ga = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
        gb = 0.5 * b * (1.0 + tl.math.erf(b * 0.7071067811865476))
    tl.atomic_add(out + w[:, None] * D + offd[None, :], ga, mask=m2)
    tl.atomic_add(out + u[:, None] * D + offd[None, :], gb, mask=m2)


def _bwd_kernel(h, p, p_rs, eid, tail, head, dout, dh, dp, E, D,
                BD: tl.constexpr, BR: tl.constexpr, HAS_P: tl.constexpr, HAS_EID: tl.constexpr,
                RELU: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    mr = r < E
    offd = tl.arange(0, BD)
    m2 = mr[:, None] & (offd < D)[None, :]
    u, w, a, b, er = _endpoints(h, p, p_rs, eid, tail, head, r, mr, offd, m2, D, HAS_P, HAS_EID)
    if RELU:
        da = tl.where(a > 0.0, 1.0, 0.0)
        db = tl.where(b > 0.0, 1.0, 0.0)
    else:  # GELU'(x) = Phi(x) + x phi(x)
        da = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476)) + a * tl.exp(-0.5 * a * a) * 0.3989422804014327
        db = 0.5 * (1.0 + tl.math.erf(b * 0.7071067811865476)) + b * tl.exp(-0.5 * b * b) * 0.3989422804014327
    ga = tl.where(m2, tl.load(dout + w[:, None] * D + offd[None, :], mask=m2, other=0.0) * da, 0.0)
    gb = tl.where(m2, tl.load(dout + u[:, None] * D + offd[None, :], mask=m2, other=0.0) * db, 0.0)
    tl.atomic_add(dh + u[:, None] * D + offd[None, :], ga, mask=m2)
    tl.atomic_add(dh + w[:, None] * D + offd[None, :], gb, mask=m2)
    if HAS_P:
        tl.atomic_add(dp + er[:, None] * D + offd[None, :], ga + gb, mask=m2)


class _LocalMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base, h, p, tail, head, eid, relu, eps):
        n, d = h.shape
        ne = tail.numel()
        hc = h.contiguous()
        # messages accumulate on the base in fp32: (1 + eps) h (a new tensor, no copy), the given base, or h
        if eps is not None:
            out = hc.float() * (1 + eps.detach().float())
        else:
            out = (hc if base is None else base).to(torch.float32, copy=True)
        has_p = p is not None
        if has_p and p.stride(-1) != 1:
            p = p.contiguous()
        if ne:
            _jit(_fwd_kernel)[((ne + _ROWS - 1) // _ROWS,)](
                hc, p if has_p else hc, p.stride(0) if has_p else 0, eid if eid is not None else tail, tail, head,
                out, ne, d, BD=_pow2(d), BR=_ROWS, HAS_P=has_p, HAS_EID=eid is not None, RELU=relu)
        ctx.save_for_backward(hc, p, tail, head, eid, eps)
        ctx.has_p, ctx.relu, ctx.dtypes = has_p, relu, (h.dtype if base is None else base.dtype, h.dtype)
        ctx.own_base = base is not None
        return out.to(ctx.dtypes[0])

    @staticmethod
    def backward(ctx, dout):
        h, p, tail, head, eid, eps = ctx.saved_tensors
        n, d = h.shape
        ne = tail.numel()
        dout = dout.float().contiguous()
        # the self term's gradient starts dh: (1 + eps) dout, dout (base None: h is the base), or 0 (own base)
        if eps is not None:
            dh = dout * (1 + eps.float())
        else:
            dh = torch.zeros_like(dout) if ctx.own_base else dout.clone()
        dp = torch.zeros(p.size(0), d, dtype=torch.float32, device=h.device) if ctx.has_p else None
        if ne:
            _jit(_bwd_kernel)[((ne + _ROWS - 1) // _ROWS,)](
                h, p if ctx.has_p else h, p.stride(0) if ctx.has_p else 0, eid if eid is not None else tail, tail,
                head, dout, dh, dp if ctx.has_p else dh, ne, d, BD=_pow2(d), BR=_ROWS, HAS_P=ctx.has_p,
                HAS_EID=eid is not None, RELU=ctx.relu)
        base_dtype, h_dtype = ctx.dtypes
        dbase = dout.to(base_dtype) if ctx.own_base and ctx.needs_input_grad[0] else None
        deps = None
        if eps is not None and ctx.needs_input_grad[7]:  # d/d eps of sum(dout * (1 + eps) h): one reduction
            deps = torch.dot(dout.flatten(), h.float().flatten()).reshape(eps.shape).to(eps.dtype)
        return (dbase, dh.to(h_dtype), (dp.to(p.dtype) if ctx.has_p else None), None, None, None, None, deps)


def local_mix_triton(h: torch.Tensor, edge_index: torch.Tensor, edge_preact: Optional[torch.Tensor] = None,
                     input_edge_ids: Optional[torch.Tensor] = None, base: Optional[torch.Tensor] = None,
                     activation: str = "gelu", eps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``base + LocalBondMix(h)`` (``base`` defaults to ``h``): the activated messages of every node's bonded
    neighbours, both directions of every edge, added to ``base`` (see the module docstring). ``eps`` (a
    one-element tensor, instead of ``base``): the base is GIN's self term ``(1 + eps) * h``, made inside the
    Function (gradient to ``eps`` included): one launch fewer forward and two backward than passing
    ``h * (1 + eps)`` as ``base``.

    Shapes: h, base ``[N, D]``; edge_index ``[2, E]``; edge_preact ``[E_in, D]`` (the block's edge projection,
    row ``input_edge_ids[j]`` for edge ``j``, row ``j`` when ``input_edge_ids`` is ``None``; a column slice of a
    wider product is read in place) or ``None``; returns ``[N, D]`` in ``base``'s dtype (sums in float32).
    ``activation``: ``"gelu"`` (exact, erf) or ``"relu"``. Indices must be in range (not checked: a check
    would sync with the host).

    Example (CPU needs ``TRITON_INTERPRET=1``):
        >>> import torch
        >>> local_mix_triton(torch.zeros(3, 4), torch.tensor([[0, 1], [1, 2]])).shape
        torch.Size([3, 4])
    """
    if activation not in ("gelu", "relu"):
        raise ValueError(f"activation must be 'gelu' or 'relu', got {activation!r}")
    if eps is not None and base is not None:
        raise ValueError("pass base or eps, not both")
    tail, head = edge_index
    return _LocalMix.apply(base, h, edge_preact, tail.contiguous(), head.contiguous(),
                           input_edge_ids.contiguous() if input_edge_ids is not None else None,
                           activation == "relu", eps)
