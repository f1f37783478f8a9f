"""Triton kernels of the tiled 2D-grid pLSTM operator (``plstm_graph.ops.grid.tiled``): the two contractions
between a tile's nodes and its boundary edges, without materialising anything of size ``A * N * K``.

Per tile ``w`` (a batch of ``W`` tiles, each with ``N`` nodes and ``A`` boundary edges), float32 states:

* **scatter to boundary**  ``C[w, a] = sum_n S[w, a, n] x[w, n]^T z[w, n]``
  (``S [W, A, N]``, ``x [W, N, KX]``, ``z [W, N, KZ]`` -> ``C [W, A, KX, KZ]``): the tile's own part of the
  states leaving it (``S = Sout``, ``x = k``, ``z = v``). One program per (w, a, KX-block, KZ-block) loops
  over node blocks with ``tl.dot``: ``C_a += (x o S_a)^T z``.
* **read from boundary**  ``out[w, n] = sum_a M[w, n, a] x[w, n] C[w, a]``
  (``M [W, N, A]``, ``x [W, N, KX]``, ``C [W, A, KX, KZ]`` -> ``out [W, N, KZ]``): the inter-tile output
  (``M = Min``, ``x = q``, ``C = Cin``). One program per (w, node block) loops over ``a``:
  ``out += (x o M_a) C_a``. With ``WGRAD`` it also writes ``g[w, n, a] = sum_j u[w, n, j] (x C_a)[n, j]``.

Every backward pass is one of these two forms on transposed (strided, never copied) views:

    read:     dq = read(M, dout, C^T)  with g = dM (u = q);        dC = scatter(M^T, q, dout)
    scatter:  dk = read(S^T, z, dC^T)  with g = dS^T (u = k);      dz = read(S^T, k, dC)

``S, M`` and ``C`` are passed with explicit strides; ``x, z, u, out`` must have a unit last stride.
Tile counts ``W``, node counts ``N`` and boundary sizes ``A`` are runtime arguments; only head dims, block
sizes and precision flags are compile-time constants. Readable einsum references:
:func:`scatter_boundary_reference`, :func:`read_boundary_reference`.
"""
from __future__ import annotations

import os

import torch

from ._common import available
from ._common import bind_triton as _bind_triton
from ._common import lazy_jit as _lazy_jit
from ._common import next_pow2 as _pow2

# triton is imported on first use, never at import (see kernels/dag.py)
triton = None
tl = None


def _import_triton():
    return _bind_triton(globals())


__all__ = ["available", "supported", "scatter_boundary", "read_boundary", "scatter_boundary_reference",
           "read_boundary_reference", "wavefront_triton", "MAX_HEAD_DIM", "DOT_PRECISION"]

MAX_HEAD_DIM = 128
# tl.dot input precision for float32 operands on a GPU: "tf32x3" (the default: tensor cores, three tf32
# products per fp32 product, ~fp32 accuracy), "ieee" (fp32 FMA) or "tf32" (fastest, ~1e-3 relative). The CPU
# interpreter always uses ieee. Measured on an H200 (read kernel, W=4096 tiles, N=64, A=16, K=V=32): ieee
# 0.34 ms with a contiguous C but 1.27 ms with the transposed C^T the backward passes read; tf32x3 0.19-0.24
# ms either way. Whole 64 x 64 operator fwd+bwd: max relative error vs float64 6.4e-7 (tf32x3) vs 5.6e-7 (ieee).
DOT_PRECISION = os.environ.get("PLSTM_GRID_DOT_PRECISION", "tf32x3")
# node block of the read kernel (0 = the default rule of _nblock); a tuning knob for benchmarks/grid.py
READ_BLOCK_N = int(os.environ.get("PLSTM_GRID_READ_BN", "0"))

_HELPERS = ("_dot", "_wave_layout")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _jit(fn):
    """``triton.jit(fn)`` on first use, per interpreter mode (see :func:`._common.lazy_jit`); the device
    helper ``_dot`` is jitted for the same mode and bound as a module global before the kernel compiles."""
    tr = _import_triton()
    for name in _HELPERS:
        globals()[name] = _lazy_jit(globals()[name + "_py"], tr)
    return _lazy_jit(fn, tr)


def _dot_py(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` with ``tl.dot``. UPCAST (CPU interpreter): ``ieee`` in the accumulator's dtype."""
    if UPCAST:
        return tl.dot(a.to(acc.dtype), b.to(acc.dtype), acc, input_precision="ieee", out_dtype=acc.dtype)
    else:
        return tl.dot(a, b, acc, input_precision=PREC, out_dtype=acc.dtype)


def _scatter_kernel(s, x, z, c, N, A, s_sw, s_sa, s_sn, x_sw, x_sn, z_sw, z_sn, c_sw, c_sa, c_sx,
                    KX: tl.constexpr, KZ: tl.constexpr, BN: tl.constexpr, BKX: tl.constexpr, BKZ: tl.constexpr,
                    PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Program ``(w * A + a) * nkx * nkz + kx-block * nkz + kz-block`` (1-D grid: no 65535 cap on ``W``; the
    programs of one tile are adjacent, so its ``x, z`` are re-read from L2): ``C[w, a, kx-block, kz-block]``."""
    nkx = tl.cdiv(KX, BKX)
    nkz = tl.cdiv(KZ, BKZ)
    pid = tl.program_id(0).to(tl.int64)
    wa = pid // (nkx * nkz)
    w = wa // A
    a = wa % A
    r = pid % (nkx * nkz)
    offx = (r // nkz) * BKX + tl.arange(0, BKX)
    offz = (r % nkz) * BKZ + tl.arange(0, BKZ)
    mx = offx < KX
    mz = offz < KZ
    acc = tl.zeros([BKX, BKZ], dtype=c.dtype.element_ty)
    sbase = s + w * s_sw + a * s_sa
    n0 = 0
    while n0 < N:  # (while, not range: the CPU interpreter cannot range over runtime ints)
        offn = n0 + tl.arange(0, BN)
        mn = offn < N
        sv = tl.load(sbase + offn * s_sn, mask=mn, other=0.0)
        xb = tl.load(x + w * x_sw + offn[:, None] * x_sn + offx[None, :], mask=mn[:, None] & mx[None, :], other=0.0)
        zb = tl.load(z + w * z_sw + offn[:, None] * z_sn + offz[None, :], mask=mn[:, None] & mz[None, :], other=0.0)
        acc = _dot(tl.trans(xb * sv[:, None]), zb, acc, PREC, UPCAST)
        n0 += BN
    tl.store(c + w * c_sw + a * c_sa + offx[:, None] * c_sx + offz[None, :], acc, mask=mx[:, None] & mz[None, :])


def _read_kernel(m, x, c, out, u, g, N, A, m_sw, m_sn, m_sa, x_sw, x_sn, c_sw, c_sa, c_sx, c_sz, o_sw, o_sn,
                 u_sw, u_sn, g_sw, g_sn, g_sa,
                 KX: tl.constexpr, KZ: tl.constexpr, BN: tl.constexpr, BKX: tl.constexpr, BKZ: tl.constexpr,
                 BA: tl.constexpr, WGRAD: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Program ``w * nblocks + node block`` (1-D grid): ``out[w, nodes] = sum_a (x o M_a) C_a`` (all of KX and
    KZ in one program), with ``WGRAD`` also ``g[w, nodes, a] = rowsum(u o (x C_a))`` (all ``a < A <= BA`` kept in
    registers and stored once: column-by-column stores would be strided)."""
    nblocks = tl.cdiv(N, BN)
    pid = tl.program_id(0).to(tl.int64)
    w = pid // nblocks
    nb = pid % nblocks
    offn = nb * BN + tl.arange(0, BN)
    mn = offn < N
    offx = tl.arange(0, BKX)
    offz = tl.arange(0, BKZ)
    mx = offx < KX
    mz = offz < KZ
    xb = tl.load(x + w * x_sw + offn[:, None] * x_sn + offx[None, :], mask=mn[:, None] & mx[None, :], other=0.0)
    if WGRAD:
        ub = tl.load(u + w * u_sw + offn[:, None] * u_sn + offz[None, :], mask=mn[:, None] & mz[None, :], other=0.0)
    acc = tl.zeros([BN, BKZ], dtype=out.dtype.element_ty)
    cmask = mx[:, None] & mz[None, :]
    cptr = c + w * c_sw + offx[:, None] * c_sx + offz[None, :] * c_sz
    mptr = m + w * m_sw + offn * m_sn
    if WGRAD:
        offa = tl.arange(0, BA)
        gacc = tl.zeros([BN, BA], dtype=acc.dtype)  # g of this node block, stored once at the end
    a = 0
    while a < A:
        mv = tl.load(mptr + a * m_sa, mask=mn, other=0.0)
        cb = tl.load(cptr + a * c_sa, mask=cmask, other=0.0)
        if WGRAD:
            t = _dot(xb, cb, tl.zeros([BN, BKZ], dtype=acc.dtype), PREC, UPCAST)
            acc += mv[:, None] * t
            gacc = tl.where(offa[None, :] == a, tl.sum(ub * t, axis=1)[:, None], gacc)
        else:
            acc = _dot(xb * mv[:, None], cb, acc, PREC, UPCAST)
        a += 1
    tl.store(out + w * o_sw + offn[:, None] * o_sn + offz[None, :], acc, mask=mn[:, None] & mz[None, :])
    if WGRAD:
        tl.store(g + w * g_sw + offn[:, None] * g_sn + offa[None, :] * g_sa, gacc,
                 mask=mn[:, None] & (offa < A)[None, :])


def _wave_layout_py(A, KV, BA: tl.constexpr, BKV: tl.constexpr):
    """The wavefront kernels' block of one program ``(bh, kv-block)``: ``bh``, offsets ``blk [BA, BKV]`` into
    one tile's ``[A, KV]`` states, their mask, and the ``[BA, BA]`` mask of ``Tb``. (The right-edge rows are
    ``< Py``, the down-edge rows ``>= Py``; the kernels mask them with ``offa < where(has_right, Py, 0)``, a
    row bound rather than ``& has_right``: triton 3.9's interpreter rejects a tensor mask and-ed with a scalar.)"""
    bh = tl.program_id(0).to(tl.int64)
    offk = tl.program_id(1) * BKV + tl.arange(0, BKV)
    offa = tl.arange(0, BA)
    ma = offa < A
    m2 = ma[:, None] & (offk < KV)[None, :]
    return bh, offa[:, None] * KV + offk[None, :], m2, ma[:, None] & ma[None, :]


def _wave_fwd_kernel(tb, cloc, cin, pos, nyt, nxt, BH, A, Py, KV,
                     BA: tl.constexpr, BKV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Program ``(bh, kv-block)`` walks the tiles in row-major order: ``Cout = Tb @ Cin + Cloc``; the right-edge
    rows (``< Py``) of ``Cout`` go to the right neighbour's ``Cin``, the down-edge rows to the bottom
    neighbour's. ``cin`` must be zero on entry (grid border). ``pos[ty * nxt + tx]`` = the tile's position in
    the (anti-diagonal) storage order. A CTA barrier after each tile makes its stores visible to the next
    tile's loads (the same program reads them)."""
    bh, blk, m2, tmask = _wave_layout(A, KV, BA, BKV)
    offa = tl.arange(0, BA)
    tbo = offa[:, None] * A + offa[None, :]
    ty = 0
    while ty < nyt:
        tx = 0
        while tx < nxt:
            r = ty * nxt + tx
            p = tl.load(pos + r).to(tl.int64)
            base = (p * BH + bh) * A
            c = tl.load(cin + base * KV + blk, mask=m2, other=0.0)
            t = tl.load(tb + base * A + tbo, mask=tmask, other=0.0)
            out = tl.load(cloc + base * KV + blk, mask=m2, other=0.0)
            out = _dot(t, c, out, PREC, UPCAST)
            has_r = tx + 1 < nxt
            has_d = ty + 1 < nyt
            # neighbours' positions; at the grid's edge any valid entry (its accesses are masked off below)
            pr = tl.load(pos + tl.where(has_r, r + 1, r)).to(tl.int64)
            pd = tl.load(pos + tl.where(has_d, r + nxt, r)).to(tl.int64)
            tl.store(cin + (pr * BH + bh) * A * KV + blk, out, mask=(offa < tl.where(has_r, Py, 0))[:, None] & m2)
            tl.store(cin + (pd * BH + bh) * A * KV + blk, out, mask=(offa >= tl.where(has_d, Py, A))[:, None] & m2)
            tl.debug_barrier()
            tx += 1
        ty += 1


def _wave_bwd_kernel(tb, gin, gout, pos, nyt, nxt, BH, A, Py, KV,
                     BA: tl.constexpr, BKV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Reverse of :func:`_wave_fwd_kernel` (tiles in reverse row-major order): ``gout`` of a tile = the right
    neighbour's total entering adjoint (rows ``< Py``) and the bottom neighbour's (rows ``>= Py``); then
    ``gin += Tb^T gout``. ``gin`` holds ``dCin`` on entry and the total adjoints of the entering states on
    exit; ``gout`` (= ``dCloc``) is written for every tile."""
    bh, blk, m2, tmask = _wave_layout(A, KV, BA, BKV)
    offa = tl.arange(0, BA)
    tbt = offa[None, :] * A + offa[:, None]  # Tb transposed
    ty = nyt - 1
    while ty >= 0:
        tx = nxt - 1
        while tx >= 0:
            r = ty * nxt + tx
            p = tl.load(pos + r).to(tl.int64)
            base = (p * BH + bh) * A
            has_r = tx + 1 < nxt
            has_d = ty + 1 < nyt
            # neighbours' positions; at the grid's edge any valid entry (its accesses are masked off below)
            pr = tl.load(pos + tl.where(has_r, r + 1, r)).to(tl.int64)
            pd = tl.load(pos + tl.where(has_d, r + nxt, r)).to(tl.int64)
            go = tl.load(gin + (pr * BH + bh) * A * KV + blk, mask=(offa < tl.where(has_r, Py, 0))[:, None] & m2, other=0.0)
            go += tl.load(gin + (pd * BH + bh) * A * KV + blk, mask=(offa >= tl.where(has_d, Py, A))[:, None] & m2, other=0.0)
            tl.store(gout + base * KV + blk, go, mask=m2)
            t = tl.load(tb + base * A + tbt, mask=tmask, other=0.0)
            g = tl.load(gin + base * KV + blk, mask=m2, other=0.0)
            g = _dot(t, go, g, PREC, UPCAST)
            tl.store(gin + base * KV + blk, g, mask=m2)
            tl.debug_barrier()
            tx -= 1
        ty -= 1


def _prec(dtype) -> str:
    return DOT_PRECISION if dtype == torch.float32 else "ieee"


def _nblock(n: int, widest: int) -> int:
    """Node block: 16 .. 64 (32 for head dims above 64, keeping the register tiles small)."""
    return max(16, min(_pow2(n), 64 if widest <= 64 else 32))


def _scatter(S: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Launch: ``S [W, A, N]`` (any strides), ``x [W, N, KX]``, ``z [W, N, KZ]`` (unit last stride) ->
    ``C [W, A, KX, KZ]`` contiguous."""
    W, A, N = S.shape
    KX, KZ = x.shape[-1], z.shape[-1]
    c = torch.empty(W, A, KX, KZ, dtype=x.dtype, device=x.device)
    if W == 0 or A == 0:
        return c
    bkx = max(16, min(_pow2(KX), 64))
    bkz = max(16, min(_pow2(KZ), 64))
    grid = (W * A * (-(-KX // bkx)) * (-(-KZ // bkz)),)
    _jit(_scatter_kernel)[grid](S, x, z, c, N, A, *S.stride(), x.stride(0), x.stride(1), z.stride(0), z.stride(1),
                                c.stride(0), c.stride(1), c.stride(2), KX=KX, KZ=KZ, BN=_nblock(N, max(KX, KZ)),
                                BKX=bkx, BKZ=bkz, PREC=_prec(x.dtype), UPCAST=_interpreting())
    return c


def _read(M: torch.Tensor, x: torch.Tensor, C: torch.Tensor, u: torch.Tensor = None, g: torch.Tensor = None):
    """Launch: ``M [W, N, A]``, ``x [W, N, KX]``, ``C [W, A, KX, KZ]`` (``M``, ``C`` any strides) ->
    ``out [W, N, KZ]``; with ``u [W, N, KZ]`` also writes ``g [W, N, A]`` (any strides, e.g. a transposed
    ``[W, A, N]`` buffer) with ``g[w, n, a] = u[w, n] . (x[w, n] C[w, a])``."""
    W, N, A = M.shape
    KX, KZ = C.shape[-2], C.shape[-1]
    out = torch.empty(W, N, KZ, dtype=x.dtype, device=x.device)
    if W == 0 or N == 0:
        return out
    wgrad = u is not None
    if not wgrad:
        u, g = out, M  # unused pointers
    bn = READ_BLOCK_N or _nblock(N, max(KX, KZ))
    _jit(_read_kernel)[(W * (-(-N // bn)),)](M, x, C, out, u, g, N, A, *M.stride(), x.stride(0), x.stride(1),
                                          *C.stride(), out.stride(0), out.stride(1), u.stride(0), u.stride(1),
                                          *g.stride(), KX=KX, KZ=KZ, BN=bn, BKX=max(16, _pow2(KX)),
                                          BKZ=max(16, _pow2(KZ)), BA=_pow2(A) if wgrad else 1, WGRAD=wgrad,
                                          PREC=_prec(x.dtype),
                                          UPCAST=_interpreting())
    return out


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _ScatterBoundary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, S, x, z):
        x, z = _unit_last(x), _unit_last(z)
        ctx.save_for_backward(S, x, z)
        return _scatter(S, x, z)

    @staticmethod
    def backward(ctx, dC):
        S, x, z = ctx.saved_tensors
        dC = dC.contiguous()
        St = S.transpose(1, 2)  # [W, N, A] view
        dS = dx = dz = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dS = torch.empty_like(S, memory_format=torch.contiguous_format)  # [W, A, N]; written as [W, N, A]
            dx = _read(St, z, dC.transpose(2, 3), u=x, g=dS.transpose(1, 2))
        if ctx.needs_input_grad[2]:
            dz = _read(St, x, dC)
        return dS, dx, dz


class _ReadBoundary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, M, x, C):
        x = _unit_last(x)
        ctx.save_for_backward(M, x, C)
        return _read(M, x, C)

    @staticmethod
    def backward(ctx, dout):
        M, x, C = ctx.saved_tensors
        dout = dout.contiguous()
        dM = dx = dC = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dM = torch.empty_like(M, memory_format=torch.contiguous_format)
            dx = _read(M, dout, C.transpose(2, 3), u=x, g=dM)
        if ctx.needs_input_grad[2]:
            dC = _scatter(M.transpose(1, 2), x, dout)
        return dM, dx, dC


def _wave_blocks(BH: int, A: int, KV: int):
    """``(BA, BKV, grid)``: the boundary padded to >= 16 rows (``tl.dot``), KV blocks small enough for >= ~1k
    programs (one program walks every tile sequentially, so parallelism comes from (bh, kv-block) only)."""
    ba = max(16, _pow2(A))
    bkv = 64
    while bkv > 16 and BH * (-(-KV // bkv)) < 1024:
        bkv //= 2
    return ba, bkv, (BH, -(-KV // bkv))


class _WavefrontTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, Tb, cloc, Py, nyt, nxt, pos):
        T, BH, A, KV = cloc.shape
        cin = torch.zeros_like(cloc)
        ba, bkv, grid = _wave_blocks(BH, A, KV)
        if T and BH and KV:
            _jit(_wave_fwd_kernel)[grid](Tb, cloc, cin, pos, nyt, nxt, BH, A, Py, KV, BA=ba, BKV=bkv,
                                         PREC="ieee", UPCAST=_interpreting())
        ctx.save_for_backward(Tb, cin, pos)
        ctx.meta = (Py, nyt, nxt)
        return cin

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dcin):
        Tb, cin, pos = ctx.saved_tensors
        Py, nyt, nxt = ctx.meta
        T, BH, A, KV = cin.shape
        gin = dcin.clone(memory_format=torch.contiguous_format)
        gout = torch.empty_like(gin)
        ba, bkv, grid = _wave_blocks(BH, A, KV)
        if T and BH and KV:
            _jit(_wave_bwd_kernel)[grid](Tb, gin, gout, pos, nyt, nxt, BH, A, Py, KV, BA=ba, BKV=bkv,
                                         PREC="ieee", UPCAST=_interpreting())
        dTb = None
        if ctx.needs_input_grad[0]:
            dTb = torch.bmm(gout.flatten(0, 1), cin.flatten(0, 1).transpose(1, 2)).view_as(Tb)
        return dTb, gout, None, None, None, None


def wavefront_triton(Tb: torch.Tensor, cloc: torch.Tensor, Py: int, nyt: int, nxt: int,
                     pos: torch.Tensor) -> torch.Tensor:
    """The tile wavefront of the grid operator in one kernel launch per pass (differentiable in ``Tb`` and
    ``cloc``). Same contract as :func:`plstm_graph.ops.grid.tiled.wavefront`: ``Tb [T, BH, A, A]``,
    ``cloc [T, BH, A, KV]`` (tiles in storage order) -> ``Cin [T, BH, A, KV]``; ``pos [nyt * nxt]`` (integer)
    maps a row-major tile index to its storage position. Float32 CUDA tensors (float32/64 under the CPU
    interpreter); the ``Tb @ Cin`` products are exact fp32 (``ieee``) dots."""
    return _WavefrontTriton.apply(Tb.contiguous(), cloc.contiguous(), Py, nyt, nxt, pos)


def supported(x: torch.Tensor, z: torch.Tensor) -> bool:
    """Whether these kernels take tensors like ``x [.., KX]``, ``z [.., KZ]``: float32 on CUDA (float32 or
    float64 under the CPU interpreter), head dims <= :data:`MAX_HEAD_DIM`, triton importable."""
    if not available() or max(x.shape[-1], z.shape[-1]) > MAX_HEAD_DIM:
        return False
    if _interpreting() and x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.float64)
    return x.is_cuda and x.dtype == torch.float32


def scatter_boundary(S: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``C[w, a] = sum_n S[w, a, n] x[w, n]^T z[w, n]``, fused (differentiable in all three inputs).

    Shapes: ``S [W, A, N]``, ``x [W, N, KX]``, ``z [W, N, KZ]`` (one dtype) -> ``C [W, A, KX, KZ]``.
    Reference: :func:`scatter_boundary_reference`."""
    return _ScatterBoundary.apply(S, x, z)


def read_boundary(M: torch.Tensor, x: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``out[w, n] = sum_a M[w, n, a] x[w, n] C[w, a]``, fused (differentiable in all three inputs).

    Shapes: ``M [W, N, A]``, ``x [W, N, KX]``, ``C [W, A, KX, KZ]`` (one dtype) -> ``out [W, N, KZ]``.
    Reference: :func:`read_boundary_reference`."""
    return _ReadBoundary.apply(M, x, C)


def scatter_boundary_reference(S: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Readable reference of :func:`scatter_boundary`."""
    return torch.einsum("wan,wnk,wnv->wakv", S, x, z)


def read_boundary_reference(M: torch.Tensor, x: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Readable reference of :func:`read_boundary`."""
    return torch.einsum("wna,wnk,wakv->wnv", M, x, C)
