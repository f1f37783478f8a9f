"""Tiled (chunkwise) 2D-grid pLSTM: matmul-dominated work per tile, a short wavefront over tiles.

The grid is padded to a multiple of the tile ``Py x Px`` (padded nodes come after every real node in the
partial order of the grid DAG, so they never influence a real output) and cut into ``nYt x nXt`` tiles.
Everything below is batched over (batch, head, tile); nothing walks the grid node by node.

1. **Tile gating matrices** (scalars, one set per tile and head). Every state inside a tile is a linear
   function of ``S = N + Py + Px`` "sources": the ``N = Py*Px`` nodes of the tile (through ``source_r/d``)
   and the ``Py`` right edges entering the tile from the left and ``Px`` down edges entering from the top.
   A DP over the *rows* of the tile (``Py`` batched steps) carries, for every down edge leaving a row, its
   coefficient vector over the sources. Inside one row the right-edge chain is solved in closed form:
   ``R = L @ (source_r e_node + trans_dr * D_above)`` with ``L[j, m] = prod_{m < l <= j} trans_rr[l]``
   (a ``Px x Px`` lower-triangular matrix). This readable DP (:func:`tile_matrices`) is used for tile
   heights that are not powers of two; for powers of two (the default) :func:`tile_matrices_doubling`
   solves all rows at once in closed form and merges strips of rows pairwise, ``log2(Py)`` batched
   matmul steps (the paper's log-depth construction, over rows). Reading the marks at every node gives

   * ``G   [N, N]``      node -> node path sums inside the tile (``direct`` is added separately),
   * ``Min [N, A]``      boundary edge entering the tile -> node (``A = Py + Px``: rows, then columns),

   and the states of the edges leaving the tile give

   * ``Sout [A, N]``     node -> boundary edge leaving the tile,
   * ``Tb   [A, A]``     entering boundary edge -> leaving boundary edge.

2. **Local terms**: ``y_intra = ((Q K^T) * G) V + direct_n (q_n . k_n) v_n`` (matmuls) and the tile's own
   contribution to its leaving states ``Cloc[a] = sum_u Sout[a, u] k_u v_u^T``.
3. **Wavefront over tiles** (``nYt + nXt - 1`` steps, all tiles of one anti-diagonal at once):
   ``Cout = Tb @ Cin + Cloc``, where ``Cin`` of a tile is the right-edge states leaving its left
   neighbour and the down-edge states leaving its top neighbour (zero at the grid border).
4. **Inter-tile output**: ``y_n += sum_a Min[n, a] q_n^T Cin_a``.

Layout: tiles are gathered once into anti-diagonal order (tile outermost, then batch, then head), so each
wavefront step works on a contiguous slice. The boundary contractions of steps 2 and 4 run in fused Triton
kernels on float32 CUDA tensors (:mod:`plstm_graph.kernels.grid`, nothing of size ``A*N*K`` materialised),
else as their einsum references. Three parts are single autograd nodes with hand-written backward passes:
the strip merges (:class:`_Doubling`), the wavefront (:class:`_Wavefront`, reference
:func:`wavefront_reference`) and the Triton contractions; the rest is plain autograd.

A tile of 1 x 1 is the node-level anti-diagonal wavefront; a single tile covering the grid is the fully
parallel (quadratic) form.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["plstm_grid_tiled", "tile_matrices", "tile_matrices_doubling", "tile_blocks", "default_tile", "wavefront",
           "wavefront_reference"]


def default_tile(Y: int, X: int) -> Tuple[int, int]:
    """The tile used when none is given: a grid of side <= 16 is one tile (height rounded up to a power of
    two), a larger side is cut into tiles of 8.

    One tile makes a 16 x 16 grid (a 256 px image at patch 16) fully parallel; beyond that, tiles of 8 keep
    the per-tile gating tensors (``~P^4`` floats per tile and head) and the boundary contractions small.
    Measured on an H200 (float32, forward+backward, BH = 64, K = V = 32): 32 x 32 9.43 ms at 8 vs 9.47 at 16,
    64 x 64 14.0 vs 19.9 ms; 16 x 16 (BH 192, K = V = 64) 6.7 ms as one tile vs 15.7 at 8. A power-of-two
    height lets the tile matrices be built by log-depth doubling (:func:`tile_matrices_doubling`)."""
    py = 1 << max(0, Y - 1).bit_length() if Y <= 16 else 8
    px = X if X <= 16 else 8
    return py, px


def _row_products(t: torch.Tensor) -> torch.Tensor:
    """``t [W, Py, Px]`` -> ``P [W, Py, Px, Px + 1]`` with ``P[..., j, m+1] = prod_{m < l <= j} t[..., l]``
    for ``m = -1 .. Px-1`` (1 on ``m == j``, 0 for ``m > j``): one cumulative product over ``j`` of
    ``t[j]`` (where ``j > m``, else 1), no divisions (exact with zero transitions)."""
    Px = t.shape[-1]
    idx = torch.arange(Px, device=t.device)
    m = torch.arange(-1, Px, device=t.device)
    after = idx[:, None] > m[None, :]  # [j, m]
    prods = torch.where(after, t[..., :, None], torch.ones((), dtype=t.dtype, device=t.device)).cumprod(dim=-2)
    return prods * (m[None, :] <= idx[:, None]).to(t.dtype)


def tile_matrices(source_r, source_d, trans_rr, trans_rd, trans_dd, trans_dr, mark_r, mark_d):
    """Scalar transfer matrices of tiles, by a DP over tile rows (see the module docstring).

    Shapes:
        every gate: ``[W, Py, Px]`` (W = any batch of tiles);
        returns ``Gfull [W, N, S]`` (marks read at every node, over sources: N nodes row-major, then Py
        left-entering rows, then Px top-entering columns) and ``Tout [W, A, S]`` (states of the Py right
        edges leaving the tile, then the Px down edges leaving it), with ``N = Py*Px``, ``A = Py+Px``,
        ``S = N + A``. ``Gfull`` holds no ``direct`` term.
    """
    W, Py, Px = source_r.shape
    N = Py * Px
    S = N + Py + Px
    eye = torch.eye(S, dtype=source_r.dtype, device=source_r.device)
    prods = _row_products(trans_rr)  # [W, Py, Px, Px+1]
    Lb, L = prods[..., 0], prods[..., 1:]  # from the left boundary edge / from each node of the row
    d_prev = eye[N + Py:].expand(W, Px, S)  # down edges entering row 0 = the top boundary
    g_rows, r_out = [], []
    for i in range(Py):
        e_nodes = eye[i * Px:(i + 1) * Px]  # [Px, S] one-hot of this row's nodes
        e_left = eye[N + i]  # [S] the right edge entering this row from the left
        a = source_r[:, i, :, None] * e_nodes + trans_dr[:, i, :, None] * d_prev  # injected into r(., i)
        r = L[:, i] @ a + Lb[:, i, :, None] * e_left  # [W, Px, S] right edges leaving each node
        r_in = torch.cat([e_left.expand(W, 1, S), r[:, :-1]], dim=1)  # right edge entering each node
        g_rows.append(mark_r[:, i, :, None] * r_in + mark_d[:, i, :, None] * d_prev)
        d_prev = source_d[:, i, :, None] * e_nodes + trans_rd[:, i, :, None] * r_in + trans_dd[:, i, :, None] * d_prev
        r_out.append(r[:, -1])
    g_full = torch.cat(g_rows, dim=1)  # [W, N, S]
    t_out = torch.cat([torch.stack(r_out, dim=1), d_prev], dim=1)  # [W, A, S]
    return g_full, t_out


def _strip_merge(o: torch.Tensor, n: int, h: int, Px: int) -> torch.Tensor:
    """Merge vertically adjacent strips pairwise: ``o [W, c, R, C]`` -> ``[W, c/2, R', C']``.

    A strip of ``h`` rows (``n = h*Px`` nodes) is one matrix with rows (marks read at its ``n`` nodes,
    its ``h`` right edges leaving, its ``Px`` down edges leaving) and columns (its ``n`` nodes, its ``h``
    right edges entering, its ``Px`` down edges entering). The bottom strip's entering down edges are the
    top strip's leaving ones, so the bottom strip's rows are re-expressed through one matmul.
    """
    W, c, rows, cols = o.shape
    pair = o.reshape(W, c // 2, 2, rows, cols)
    top, bot = pair[:, :, 0], pair[:, :, 1]
    x = bot[..., n + h:] @ top[..., n + h:, :]  # bottom rows through the top strip's leaving down edges
    z = lambda k, r: o.new_zeros(W, c // 2, r, k)  # noqa: E731
    top_c = torch.cat([top[..., :n + h, :n], z(n, n + h), top[..., :n + h, n:n + h], z(h, n + h),
                       top[..., :n + h, n + h:]], dim=-1)  # top strip rows: marks, right edges leaving
    bot_c = torch.cat([x[..., :n], bot[..., :n], x[..., n:n + h], bot[..., n:n + h], x[..., n + h:]], dim=-1)
    return torch.cat([top_c[..., :n, :], bot_c[..., :n, :], top_c[..., n:, :], bot_c[..., n:, :]], dim=-2)


_INDEX_CACHE = {}


def _cached_index(key, device, build) -> torch.Tensor:
    """A long index tensor built once per (key, device): no host list -> device copy per call."""
    k = (key, str(device))
    t = _INDEX_CACHE.get(k)
    if t is None:
        if len(_INDEX_CACHE) > 512:
            _INDEX_CACHE.clear()
        t = _INDEX_CACHE[k] = torch.tensor(build(), dtype=torch.long, device=device)
    return t


@functools.lru_cache(maxsize=64)
def _merge_index(n: int, h: int, Px: int):
    """Where a merge puts its pieces (see :func:`_strip_merge`), as index lists into the merged matrix:
    ``rows_top`` (the top strip's marks and right-leaving rows), ``rows_bot`` (all rows of the bottom strip),
    ``cols_top`` (all columns of the top strip, also those of ``x``), ``cols_bot`` (the bottom strip's nodes
    and right-entering columns)."""
    R2 = 2 * (n + h) + Px
    rng = lambda a, b: list(range(a, b))  # noqa: E731
    return (rng(0, n) + rng(2 * n, 2 * n + h), rng(n, 2 * n) + rng(2 * n + h, R2),
            rng(0, n) + rng(2 * n, 2 * n + h) + rng(2 * n + 2 * h, R2), rng(n, 2 * n) + rng(2 * n + h, 2 * n + 2 * h))


def _strip_merge_backward(g: torch.Tensor, o: torch.Tensor, n: int, h: int) -> torch.Tensor:
    """Gradient of :func:`_strip_merge` w.r.t. its input ``o [W, c, R, C]`` from ``g [W, c/2, R', C']``:
    a few gathers and two batched matmuls (autograd through the merge's slices and cats would instead add
    one zero-filled input-sized gradient per slice)."""
    W, c, R, C = o.shape
    m = n + h
    pair = o.reshape(W, c // 2, 2, R, C)
    top, bot = pair[:, :, 0], pair[:, :, 1]
    rows_top, rows_bot, cols_top, cols_bot = (
        _cached_index(("merge", n, h, C - m, i), g.device, lambda i=i: _merge_index(n, h, C - m)[i]) for i in range(4))
    gb = g.index_select(-2, rows_bot)  # [W, c/2, R, R'] rows of the bottom strip
    gx = gb.index_select(-1, cols_top)  # [W, c/2, R, C] gradient of x = bot[..., m:] @ top[..., m:, :]
    g_bot = torch.cat([gb.index_select(-1, cols_bot), gx @ top[..., m:, :].transpose(-1, -2)], dim=-1)
    g_top = torch.cat([g.index_select(-2, rows_top).index_select(-1, cols_top),
                       bot[..., m:].transpose(-1, -2) @ gx], dim=-2)
    return torch.stack([g_top, g_bot], dim=2).reshape(W, c, R, C)


class _Doubling(torch.autograd.Function):
    """The ``log2(Py)`` strip merges of :func:`tile_blocks_doubling` as one autograd node: forward by
    :func:`_strip_merge` without a graph, backward by :func:`_strip_merge_backward`; returns the four
    blocks ``G [W, N, N]``, ``Min [W, N, A]``, ``Sout [W, A, N]``, ``Tb [W, A, A]`` as contiguous tensors."""

    @staticmethod
    def forward(ctx, o, Px):
        levels, h = [], 1
        while o.shape[1] > 1:
            levels.append((o, h * Px, h))
            o = _strip_merge(o, h * Px, h, Px)
            h *= 2
        o = o[:, 0]  # [W, N + A, N + A]
        N = o.shape[-1] - h - Px
        ctx.save_for_backward(*[lv[0] for lv in levels])
        ctx.meta = ([lv[1:] for lv in levels], N, o.shape)
        return (o[:, :N, :N].contiguous(), o[:, :N, N:].contiguous(), o[:, N:, :N].contiguous(),
                o[:, N:, N:].contiguous())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gG, gMin, gSout, gTb):
        ins = ctx.saved_tensors
        nh, N, shape = ctx.meta
        ref = next(x for x in (gG, gMin, gSout, gTb) if x is not None)
        g = ref.new_zeros(shape)
        for blk, rs, cs in ((gG, slice(None, N), slice(None, N)), (gMin, slice(None, N), slice(N, None)),
                            (gSout, slice(N, None), slice(None, N)), (gTb, slice(N, None), slice(N, None))):
            if blk is not None:
                g[:, rs, cs] = blk
        g = g[:, None]
        for o, (n, h) in zip(reversed(ins), reversed(nh)):
            g = _strip_merge_backward(g, o, n, h)
        return g, None


def _row_matrices(source_r, source_d, trans_rr, trans_rd, trans_dd, trans_dr, mark_r, mark_d) -> torch.Tensor:
    """Every tile row solved in closed form: ``[W, Py, 2Px+1, 2Px+1]``, rows (marks at the row's ``Px``
    nodes, its right edge leaving, its ``Px`` down edges leaving), columns (its ``Px`` nodes, its left edge,
    its ``Px`` top edges)."""
    W, Py, Px = source_r.shape
    S1 = 2 * Px + 1  # one row's sources: its Px nodes, its left edge, its Px top edges
    eye = torch.eye(S1, dtype=source_r.dtype, device=source_r.device)
    prods = _row_products(trans_rr)  # [W, Py, Px, Px+1]
    Lb, L = prods[..., 0], prods[..., 1:]
    # right edge leaving every node, over the row's sources
    r = torch.cat([L * source_r[..., None, :], Lb[..., None], L * trans_dr[..., None, :]], dim=-1)  # [W,Py,Px,S1]
    r_in = torch.cat([eye[Px].expand(W, Py, 1, S1), r[..., :-1, :]], dim=-2)  # right edge entering
    d_in = eye[Px + 1:]  # [Px, S1] down edge entering every node (the row's top boundary)
    marks = mark_r[..., None] * r_in + mark_d[..., None] * d_in
    d_out = source_d[..., None] * eye[:Px] + trans_rd[..., None] * r_in + trans_dd[..., None] * d_in
    return torch.cat([marks, r[..., -1:, :], d_out], dim=-2)  # [W, Py, 2Px+1, S1]


def tile_blocks_doubling(source_r, source_d, trans_rr, trans_rd, trans_dd, trans_dr, mark_r, mark_d):
    """The tile matrices as four blocks ``(G [W, N, N], Min [W, N, A], Sout [W, A, N], Tb [W, A, A])``
    (``Py`` a power of two): rows solved in closed form, then ``log2(Py)`` pairwise strip merges
    (:func:`_strip_merge`) in one autograd node (:class:`_Doubling`)."""
    W, Py, Px = source_r.shape
    if Py & (Py - 1):
        raise ValueError(f"tile_matrices_doubling needs a power-of-two tile height, got {Py}")
    o = _row_matrices(source_r, source_d, trans_rr, trans_rd, trans_dd, trans_dr, mark_r, mark_d)
    return _Doubling.apply(o, Px)


def tile_matrices_doubling(source_r, source_d, trans_rr, trans_rd, trans_dd, trans_dr, mark_r, mark_d):
    """Same result as :func:`tile_matrices` (``Py`` must be a power of two), in ``log2(Py)`` batched steps:
    every row of every tile is solved in closed form at once, then strips are merged pairwise
    (:func:`_strip_merge`), each merge one batched matmul."""
    G, Min, Sout, Tb = tile_blocks_doubling(source_r, source_d, trans_rr, trans_rd, trans_dd, trans_dr, mark_r,
                                            mark_d)
    return torch.cat([G, Min], dim=-1), torch.cat([Sout, Tb], dim=-1)


def tile_blocks(source_r, source_d, trans_rr, trans_rd, trans_dd, trans_dr, mark_r, mark_d):
    """``(G, Min, Sout, Tb)`` of every tile: :func:`tile_blocks_doubling` for power-of-two heights, else the
    row DP :func:`tile_matrices`."""
    gates = (source_r, source_d, trans_rr, trans_rd, trans_dd, trans_dr, mark_r, mark_d)
    Py, Px = source_r.shape[1:]
    if Py & (Py - 1) == 0:
        return tile_blocks_doubling(*gates)
    g_full, t_out = tile_matrices(*gates)
    N = Py * Px
    return g_full[..., :N], g_full[..., N:], t_out[..., :N], t_out[..., N:]


@functools.lru_cache(maxsize=128)
def _diagonal_plan(nyt: int, nxt: int):
    """Tiles in anti-diagonal order and the slices of one wavefront step.

    Returns ``(tys, txs, steps)``: position ``p`` of the tile order holds tile ``(tys[p], txs[p])``; the tiles of
    diagonal ``s`` (``ty + tx = s``, ascending ``ty``) are the contiguous positions ``p0 .. p1``. ``steps[s]`` =
    ``(p0, p1, right, down)`` for ``s = 0 .. nYt+nXt-3``: ``right = (a0, a1, b0)`` copies the right-edge part
    of the leaving states of positions ``a0 .. a1`` into the entering states of positions ``b0 .. b0+a1-a0``
    (their right neighbours, on diagonal ``s+1``), ``down`` likewise for the bottom neighbours (``None`` if
    there are none)."""
    tys, txs, offs, lo = [], [], [0], []
    for s in range(nyt + nxt - 1):
        lo.append(max(0, s - nxt + 1))
        for ty in range(lo[-1], min(nyt - 1, s) + 1):
            tys.append(ty)
            txs.append(s - ty)
        offs.append(len(tys))
    steps = []
    for s in range(nyt + nxt - 2):
        p0, p1, l0, l1 = offs[s], offs[s + 1], lo[s], lo[s + 1]
        hi = l0 + (p1 - p0) - 1  # last ty of diagonal s
        right = (p0 + l1 - l0, p1, p1) if hi >= l1 else None  # ty in [l1, hi] -> (ty, tx+1) at ty - l1
        hb = min(hi, nyt - 2)
        down = (p0, p0 + hb - l0 + 1, p1 + l0 + 1 - l1) if hb >= l0 else None  # ty in [l0, hb] -> (ty+1, tx)
        steps.append((p0, p1, right, down))
    return tuple(tys), tuple(txs), tuple(steps)


def _to_tiles(t: torch.Tensor, Py: int, Px: int, tys, txs) -> torch.Tensor:
    """``[B, Y, X, H, F]`` -> ``[T * B * H, Py * Px, F]`` (zero-padded to whole tiles), tiles in the order
    ``(tys, txs)`` (outermost), then batch, then head: one gather."""
    B, Y, X, H, f = t.shape
    nyt, nxt = -(-Y // Py), -(-X // Px)
    pad_y, pad_x = nyt * Py - Y, nxt * Px - X
    if pad_y or pad_x:
        t = F.pad(t, [0, 0, 0, 0, 0, pad_x, 0, pad_y])
    t = t.reshape(B, nyt, Py, nxt, Px, H, f).permute(1, 3, 0, 5, 2, 4, 6)  # [nyt, nxt, B, H, Py, Px, F] view
    idx_y = _cached_index(("tys", tys), t.device, lambda: tys)
    idx_x = _cached_index(("txs", txs), t.device, lambda: txs)
    return t[idx_y, idx_x].reshape(len(tys) * B * H, Py * Px, f)


def _tile_positions(tys, txs, nxt: int, device) -> torch.Tensor:
    """``pos [nyt * nxt]`` int32: the storage position (anti-diagonal order) of every tile in row-major order."""
    return _cached_index(("inv", tys, txs), device,
                         lambda: sorted(range(len(tys)), key=lambda p: tys[p] * nxt + txs[p]))


def _from_tiles(t: torch.Tensor, B: int, H: int, Y: int, X: int, Py: int, Px: int, tys, txs) -> torch.Tensor:
    """Inverse of :func:`_to_tiles`: ``[T * B * H, Py * Px, F]`` -> ``[B, Y, X, H, F]``."""
    nyt, nxt = -(-Y // Py), -(-X // Px)
    f = t.shape[-1]
    inv = _tile_positions(tys, txs, nxt, t.device)  # row-major -> position
    t = t.reshape(len(tys), B, H, Py, Px, f)[inv].reshape(nyt, nxt, B, H, Py, Px, f)
    return t.permute(2, 0, 4, 1, 5, 3, 6).reshape(B, nyt * Py, nxt * Px, H, f)[:, :Y, :X]


class _Wavefront(torch.autograd.Function):
    """The wavefront over tiles as one autograd node (no per-step graph, no per-step index tensors).

    Forward, diagonal by diagonal: ``Cout = Tb @ Cin + Cloc``; the leaving right-edge states go to the
    right neighbour's entering states, the leaving down-edge states to the bottom neighbour's (zero at the
    grid border). Backward, diagonals in reverse: ``dCout`` = the neighbours' total entering adjoints,
    ``dCin += Tb^T dCout``; then ``dTb = dCout Cin^T`` (one batched matmul) and ``dCloc = dCout``.
    Reference: :func:`wavefront_reference`."""

    @staticmethod
    def forward(ctx, Tb, cloc, Py, steps):
        T, BH, A, KV = cloc.shape
        cin = cloc.new_zeros(T, BH, A, KV)
        for p0, p1, right, down in steps:
            cout = torch.baddbmm(cloc[p0:p1].flatten(0, 1), Tb[p0:p1].flatten(0, 1),
                                 cin[p0:p1].flatten(0, 1)).view(p1 - p0, BH, A, KV)
            if right is not None:
                a0, a1, b0 = right
                cin[b0:b0 + a1 - a0, :, :Py] = cout[a0 - p0:a1 - p0, :, :Py]
            if down is not None:
                a0, a1, b0 = down
                cin[b0:b0 + a1 - a0, :, Py:] = cout[a0 - p0:a1 - p0, :, Py:]
        ctx.save_for_backward(Tb, cin)
        ctx.meta = (Py, steps)
        return cin

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dcin):
        Tb, cin = ctx.saved_tensors
        Py, steps = ctx.meta
        gin = dcin.clone(memory_format=torch.contiguous_format)  # total adjoint of the entering states
        gout = torch.zeros_like(gin)  # adjoint of the leaving states (= d cloc)
        for p0, p1, right, down in reversed(steps):
            if right is not None:
                a0, a1, b0 = right
                gout[a0:a1, :, :Py] = gin[b0:b0 + a1 - a0, :, :Py]
            if down is not None:
                a0, a1, b0 = down
                gout[a0:a1, :, Py:] = gin[b0:b0 + a1 - a0, :, Py:]
            gin[p0:p1].flatten(0, 1).baddbmm_(Tb[p0:p1].flatten(0, 1).transpose(1, 2), gout[p0:p1].flatten(0, 1))
        dTb = None
        if ctx.needs_input_grad[0]:
            dTb = torch.bmm(gout.flatten(0, 1), cin.flatten(0, 1).transpose(1, 2)).view_as(Tb)
        return dTb, gout, None, None


def wavefront(Tb: torch.Tensor, cloc: torch.Tensor, Py: int, nyt: int, nxt: int) -> torch.Tensor:
    """States entering every tile. Shapes: ``Tb [T, BH, A, A]``, ``cloc [T, BH, A, KV]`` (tiles in the
    anti-diagonal order of :func:`_diagonal_plan`) -> ``Cin [T, BH, A, KV]`` (rows ``:Py`` right edges,
    ``Py:`` down edges)."""
    if Tb.shape[0] != nyt * nxt or cloc.shape[:3] != Tb.shape[:3] or Tb.shape[-1] != Tb.shape[-2]:
        raise ValueError(f"wavefront: Tb {list(Tb.shape)} / cloc {list(cloc.shape)} do not match {nyt}x{nxt} tiles")
    return _Wavefront.apply(Tb.contiguous(), cloc.contiguous(), Py, _diagonal_plan(nyt, nxt)[2])


def wavefront_reference(Tb: torch.Tensor, cloc: torch.Tensor, Py: int, nyt: int, nxt: int) -> torch.Tensor:
    """Readable reference of :func:`wavefront`: tile by tile in row-major order, plain autograd."""
    tys, txs, _ = _diagonal_plan(nyt, nxt)
    pos = {(ty, tx): p for p, (ty, tx) in enumerate(zip(tys, txs))}
    zero = cloc.new_zeros(cloc.shape[1:])
    cin, cout = {}, {}
    for ty in range(nyt):
        for tx in range(nxt):
            r = cout[(ty, tx - 1)][:, :Py] if tx > 0 else zero[:, :Py]
            d = cout[(ty - 1, tx)][:, Py:] if ty > 0 else zero[:, Py:]
            p = pos[(ty, tx)]
            cin[p] = torch.cat([r, d], dim=1)
            cout[(ty, tx)] = Tb[p] @ cin[p] + cloc[p]
    return torch.stack([cin[p] for p in range(len(tys))])


def _use_triton(q: torch.Tensor, v: torch.Tensor, use_triton: Optional[bool]) -> bool:
    if use_triton is False:
        return False
    from ...kernels import grid as _kgrid  # lazy: triton is imported only when a kernel runs

    ok = _kgrid.supported(q, v)
    if use_triton is None:
        return ok and q.is_cuda  # the CPU interpreter only when asked for (tests)
    if not ok:
        raise ValueError("use_triton=True needs triton and float32 CUDA tensors (or TRITON_INTERPRET=1 on CPU) "
                         f"with head dims <= {_kgrid.MAX_HEAD_DIM}; got {q.dtype} on {q.device}, "
                         f"K={q.shape[-1]}, V={v.shape[-1]}")
    return ok


def plstm_grid_tiled(q, k, v, source_r, source_d, trans_rr, trans_rd, trans_dd, trans_dr, mark_r, mark_d, direct,
                     tile: Tuple[int, int], use_triton: Optional[bool] = None) -> torch.Tensor:
    """Shapes: q, k ``[B, Y, X, H, K]``; v ``[B, Y, X, H, V]``; gates ``[B, Y, X, H]``; ``tile = (Py, Px)``;
    returns ``[B, Y, X, H, V]`` (in the inputs' dtype; call with float32/float64 tensors).

    ``use_triton``: the boundary contractions (steps 2 and 4) in fused Triton kernels
    (:mod:`plstm_graph.kernels.grid`); ``None`` = when supported (float32 CUDA tensors, triton installed),
    ``True`` = always (a ValueError where unsupported; CPU tensors need ``TRITON_INTERPRET=1``), ``False`` =
    the torch einsum path."""
    B, Y, X, H, dk = q.shape
    dv = v.shape[-1]
    Py, Px = tile
    N, A = Py * Px, Py + Px
    nyt, nxt = -(-Y // Py), -(-X // Px)
    tys, txs, _ = _diagonal_plan(nyt, nxt)
    W = nyt * nxt * B * H  # tiles outermost (anti-diagonal order), then batch, then head
    Qw, Kw, Vw = (_to_tiles(t, Py, Px, tys, txs) for t in (q, k, v))  # [W, N, K]
    gates = torch.stack([source_r, source_d, trans_rr, trans_rd, trans_dd, trans_dr, mark_r, mark_d, direct], -1)
    gates = _to_tiles(gates, Py, Px, tys, txs)  # [W, N, 9]: one gather for all nine gates
    tiled = [gates[..., i].view(W, Py, Px) for i in range(8)]
    G, Min, Sout, Tb = tile_blocks(*tiled)  # [W, N, N] [W, N, A] [W, A, N] [W, A, A]
    qk = torch.bmm(Qw, Kw.transpose(1, 2))  # [W, N, N]
    y = torch.bmm(qk * G, Vw)  # intra-tile paths
    y = y + (gates[..., 8] * torch.diagonal(qk, dim1=1, dim2=2))[..., None] * Vw  # direct: d_n (q_n . k_n) v_n
    if nyt * nxt > 1:
        triton = _use_triton(q, v, use_triton)
        if triton:
            from ...kernels.grid import read_boundary, scatter_boundary
        else:
            from ...kernels.grid import read_boundary_reference as read_boundary
            from ...kernels.grid import scatter_boundary_reference as scatter_boundary
        c_loc = scatter_boundary(Sout, Kw, Vw)  # [W, A, K, V] tile's own part of its leaving states
        T = nyt * nxt
        Tb, c_loc = Tb.reshape(T, B * H, A, A), c_loc.reshape(T, B * H, A, dk * dv)
        if triton:  # one launch per pass, tiles walked in row-major order
            from ...kernels.grid import wavefront_triton

            c_in = wavefront_triton(Tb, c_loc, Py, nyt, nxt, _tile_positions(tys, txs, nxt, q.device))
        else:
            c_in = wavefront(Tb, c_loc, Py, nyt, nxt)
        y = y + read_boundary(Min, Qw, c_in.view(W, A, dk, dv))
    return _from_tiles(y, B, H, Y, X, Py, Px, tys, txs)
