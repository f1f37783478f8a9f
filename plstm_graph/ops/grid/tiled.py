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

   * ``G   [N, N]``      node -> node path sums inside the tile (+ ``direct`` on the diagonal),
   * ``Min [N, A]``      boundary edge entering the tile -> node (``A = Py + Px``: rows, then columns),

   and the states of the edges leaving the tile give

   * ``Sout [A, N]``     node -> boundary edge leaving the tile,
   * ``Tb   [A, A]``     entering boundary edge -> leaving boundary edge.

2. **Local terms** (matmuls): ``y_intra = ((Q K^T) * G) V`` and the tile's own contribution to its
   leaving states ``Cloc[a] = sum_u Sout[a, u] k_u v_u^T``.
3. **Wavefront over tiles** (``nYt + nXt - 1`` steps, all tiles of one anti-diagonal at once):
   ``Cout = Tb @ Cin + Cloc``, where ``Cin`` of a tile is the right-edge states leaving its left
   neighbour and the down-edge states leaving its top neighbour (zero at the grid border).
4. **Inter-tile output**: ``y_n += sum_a Min[n, a] q_n^T Cin_a``, one matmul of
   ``[N, A*K] x [A*K, V]`` per tile.

A tile of 1 x 1 is the node-level anti-diagonal wavefront; a single tile covering the grid is the fully
parallel (quadratic) form. Gradients are plain autograd through these batched ops.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["plstm_grid_tiled", "tile_matrices", "tile_matrices_doubling", "default_tile"]


def default_tile(Y: int, X: int) -> Tuple[int, int]:
    """The tile used when none is given: ``(min(16, next power of two >= Y), min(16, X))``.

    16 makes a 16 x 16 grid (a 256 px image at patch 16) one fully parallel tile and keeps the per-tile
    gating tensors (``~P^4`` floats per tile and head) small at 32 x 32 .. 128 x 128; a power-of-two height
    lets the tile matrices be built by log-depth doubling (:func:`tile_matrices_doubling`)."""
    return min(16, 1 << max(0, Y - 1).bit_length()), min(16, X)


def _row_products(t: torch.Tensor) -> torch.Tensor:
    """``t [W, Py, Px]`` -> ``P [W, Py, Px, Px + 1]`` with ``P[..., j, m+1] = prod_{m < l <= j} t[..., l]``
    for ``m = -1 .. Px-1`` (1 on ``m == j``, 0 for ``m > j``)."""
    Px = t.shape[-1]
    idx = torch.arange(Px, device=t.device)
    m = torch.arange(-1, Px, device=t.device)
    inside = (m[None, :, None] < idx[None, None, :]) & (idx[None, None, :] <= idx[:, None, None])  # [j, m, l]
    prods = torch.where(inside, t[..., None, None, :], torch.ones((), dtype=t.dtype, device=t.device)).prod(-1)
    causal = (m[None, :] <= idx[:, None]).to(t.dtype)  # [j, m]
    return prods * causal


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


def tile_matrices_doubling(source_r, source_d, trans_rr, trans_rd, trans_dd, trans_dr, mark_r, mark_d):
    """Same result as :func:`tile_matrices` (``Py`` must be a power of two), in ``log2(Py)`` batched steps:
    every row of every tile is solved in closed form at once, then strips are merged pairwise
    (:func:`_strip_merge`), each merge one batched matmul."""
    W, Py, Px = source_r.shape
    if Py & (Py - 1):
        raise ValueError(f"tile_matrices_doubling needs a power-of-two tile height, got {Py}")
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
    o = torch.cat([marks, r[..., -1:, :], d_out], dim=-2)  # [W, Py, 2Px+1, S1]
    h = 1
    while o.shape[1] > 1:
        o = _strip_merge(o, h * Px, h, Px)
        h *= 2
    o = o[:, 0]  # [W, N + Py + Px, S]
    N = Py * Px
    return o[:, :N], o[:, N:]


def _to_tiles(t: torch.Tensor, Py: int, Px: int) -> torch.Tensor:
    """``[B, Y, X, H, *F]`` -> ``[B, H, nYt, nXt, Py*Px, *F]`` (zero-padded to whole tiles)."""
    B, Y, X, H = t.shape[:4]
    feat = t.shape[4:]
    nyt, nxt = -(-Y // Py), -(-X // Px)
    pad_y, pad_x = nyt * Py - Y, nxt * Px - X
    if pad_y or pad_x:
        pad = [0, 0] * (1 + len(feat)) + [0, pad_x, 0, pad_y]
        t = F.pad(t, pad)
    t = t.reshape(B, nyt, Py, nxt, Px, H, *feat)
    perm = [0, 5, 1, 3, 2, 4] + list(range(6, 6 + len(feat)))
    return t.permute(*perm).reshape(B, H, nyt, nxt, Py * Px, *feat)


def _from_tiles(t: torch.Tensor, Y: int, X: int, Py: int, Px: int) -> torch.Tensor:
    """Inverse of :func:`_to_tiles` for ``[B, H, nYt, nXt, N, F]`` -> ``[B, Y, X, H, F]``."""
    B, H, nyt, nxt, _, f = t.shape
    t = t.reshape(B, H, nyt, nxt, Py, Px, f).permute(0, 2, 4, 3, 5, 1, 6)
    return t.reshape(B, nyt * Py, nxt * Px, H, f)[:, :Y, :X]


def plstm_grid_tiled(q, k, v, source_r, source_d, trans_rr, trans_rd, trans_dd, trans_dr, mark_r, mark_d, direct,
                     tile: Tuple[int, int]) -> torch.Tensor:
    """Shapes: q, k ``[B, Y, X, H, K]``; v ``[B, Y, X, H, V]``; gates ``[B, Y, X, H]``; ``tile = (Py, Px)``;
    returns ``[B, Y, X, H, V]`` (in the inputs' dtype; call with float32/float64 tensors)."""
    B, Y, X, H, dk = q.shape
    dv = v.shape[-1]
    Py, Px = tile
    N, A = Py * Px, Py + Px
    Qt, Kt, Vt = _to_tiles(q, Py, Px), _to_tiles(k, Py, Px), _to_tiles(v, Py, Px)  # [B, H, nyt, nxt, N, K]
    nyt, nxt = Qt.shape[2], Qt.shape[3]
    gates = [_to_tiles(g, Py, Px) for g in (source_r, source_d, trans_rr, trans_rd, trans_dd, trans_dr,
                                            mark_r, mark_d, direct)]
    W = B * H * nyt * nxt
    tiled = [g.reshape(W, Py, Px) for g in gates[:8]]
    build = tile_matrices_doubling if Py & (Py - 1) == 0 else tile_matrices
    g_full, t_out = build(*tiled)  # [W, N, S], [W, A, S]
    G = torch.diag_embed(gates[8].reshape(W, N)) + g_full[..., :N]  # [W, N, N]
    Qw, Kw, Vw = Qt.reshape(W, N, dk), Kt.reshape(W, N, dk), Vt.reshape(W, N, dv)
    y = ((Qw @ Kw.transpose(1, 2)) * G) @ Vw  # [W, N, V] intra-tile (and direct)
    ntiles = nyt * nxt
    if ntiles > 1:
        Min, Sout, Tb = g_full[..., N:], t_out[..., :N], t_out[..., N:]  # [W,N,A] [W,A,N] [W,A,A]
        k_exp = (Sout[..., None] * Kw[:, None]).transpose(2, 3).reshape(W, A * dk, N)  # [W, A*K, N]
        c_loc = (k_exp @ Vw).reshape(B * H, nyt, nxt, A, dk * dv)  # tile's own part of its leaving states
        Tb = Tb.reshape(B * H, nyt, nxt, A, A)
        zero_r = q.new_zeros(B * H, Py, dk * dv)
        zero_d = q.new_zeros(B * H, Px, dk * dv)
        r_out, d_out, c_in = {}, {}, {}
        for s in range(nyt + nxt - 1):
            cells = [(ty, s - ty) for ty in range(max(0, s - nxt + 1), min(nyt, s + 1))]
            ins = torch.stack([
                torch.cat([r_out[(ty, tx - 1)] if tx > 0 else zero_r,
                           d_out[(ty - 1, tx)] if ty > 0 else zero_d], dim=1)
                for ty, tx in cells], dim=1)  # [BH, nd, A, K*V]
            for i, cell in enumerate(cells):
                c_in[cell] = ins[:, i]
            if s == nyt + nxt - 2:
                break  # the last tile's leaving states are never read
            tys = torch.tensor([c[0] for c in cells], device=q.device)
            txs = torch.tensor([c[1] for c in cells], device=q.device)
            outs = Tb[:, tys, txs] @ ins + c_loc[:, tys, txs]  # [BH, nd, A, K*V]
            for i, cell in enumerate(cells):
                r_out[cell], d_out[cell] = outs[:, i, :Py], outs[:, i, Py:]
        cin = torch.stack([c_in[(ty, tx)] for ty in range(nyt) for tx in range(nxt)], dim=1)  # [BH, T, A, KV]
        q_exp = (Min[..., None] * Qw[:, :, None]).reshape(W, N, A * dk)  # [W, N, A*K]
        y = y + q_exp @ cin.reshape(W, A * dk, dv)
    return _from_tiles(y.reshape(B, H, nyt, nxt, N, dv), Y, X, Py, Px)
