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
   matmul steps (the paper's log-depth construction, over rows). On that path every row matrix is one
   gather of products (:func:`_row_matrices`) and every merge one matmul, one cat and one gather through a
   cached index map (:func:`_merge_maps`), all in one autograd node (:class:`_TileBlocks`) whose backward
   is written out (gathers and small matmuls): few kernel launches, as the operator is host-bound on a
   GPU. Reading the marks at every node gives

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
the tile matrices of power-of-two height (:class:`_TileBlocks`, reference :func:`tile_matrices`; it also
puts the ``direct`` gates on the diagonal of ``G``, where ``G`` is 0, so step 2 is one ``(QK^T * G) V``),
the wavefront (:class:`_Wavefront`, reference :func:`wavefront_reference`) and the Triton contractions; the
rest is plain autograd.

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


def _cached_index(key, device, build, dtype=torch.long) -> torch.Tensor:
    """A tensor (long unless ``dtype`` says otherwise) built once per (key, device, dtype) from the nested list
    ``build()``: no host list -> device copy per call. Shared: never modify the result in place."""
    k = (key, str(device), dtype)
    t = _INDEX_CACHE.get(k)
    if t is None:
        if len(_INDEX_CACHE) > 512:
            _INDEX_CACHE.clear()
        t = _INDEX_CACHE[k] = torch.tensor(build(), dtype=dtype, device=device)
    return t


def _pick(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[..., idx]`` for a 1-D long ``idx``, one gather (faster than ``index_select`` on the last dim on CPU)."""
    return t.gather(-1, idx.expand(*t.shape[:-1], idx.numel()))


def _zero(ref: torch.Tensor, *shape) -> torch.Tensor:
    """A zero-filled ``shape`` of ``ref``'s dtype and device without a launch: a cached scalar, expanded."""
    return _cached_index("zero", ref.device, lambda: 0, ref.dtype).expand(*shape)


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


_GATE = {name: i for i, name in enumerate(("source_r", "source_d", "trans_rr", "trans_rd", "trans_dd", "trans_dr",
                                          "mark_r", "mark_d", "direct"))}


def _block_order(side: int, N: int):
    """Flat positions of a ``side x side`` matrix in block order: ``[:N, :N]``, ``[:N, N:]``, ``[N:, :N]``,
    ``[N:, N:]``, each row-major (so the four blocks are contiguous pieces of one buffer)."""
    lo, hi = range(N), range(N, side)
    return [r * side + c for rs, cs in ((lo, lo), (lo, hi), (hi, lo), (hi, hi)) for r in rs for c in cs]


@functools.lru_cache(maxsize=32)
def _row_maps(Px: int):
    """Index maps of the closed-form row matrices (:func:`_row_matrices`, one tile row at a time).

    A row's gates are ``g [Px, 9]`` (flat ``9 p + gate``) and ``Q [Px+1, Px+1]`` with
    ``Q[a, b] = prod_{b <= l < a} trans_rr[l]`` (1 on the diagonal, 0 above it): the right edge entering node
    ``a`` (``a = Px``: leaving the row) over the row's sources is ``Q[a, 0]`` from the left edge and
    ``Q[a, m+1] source_r[m]`` / ``Q[a, m+1] trans_dr[m]`` from node ``m`` / the top edge ``m``. Every entry of
    the row matrix (rows: marks at the ``Px`` nodes, right edge leaving, ``Px`` down edges leaving; columns:
    ``Px`` nodes, left edge, ``Px`` top edges) is ``rowcoef * Q[a, b] * colcoef`` with
    ``rowcoef = mark_r | 1 | trans_rd``, ``colcoef = source_r | 1 | trans_dr``, except three diagonals
    where that product is structurally 0 and the entry is one gate: ``(mark j, top j) = mark_d[j]``,
    ``(down j, node j) = source_d[j]``, ``(down j, top j) = trans_dd[j]``.

    Returns lists into ``V = [g flat, Q flat]``: ``fwd [3 E]`` (the three factors of every entry, ``E``
    entries row-major; a diagonal entry is ``gate * 1 * 1``), ``bwd`` (for the backward, concatenated:
    ``Qx [E]`` the ``Q`` factor of every entry, 0 on the diagonals; rowcoef ``[R1]``, colcoef ``[S1]``;
    ``A [R1, Px]``, ``A[r, l] = Q[a(r), l+1]``; ``B [Px, S1]``, ``B[l, c] = Q[l, b(c)]``, with ``a(r)``,
    ``b(c)`` the ``Q`` row and column that row ``r`` and column ``c`` read), ``diag [3 Px]`` (flat entries
    of the ``mark_d``, ``source_d``, ``trans_dd`` diagonals), ``tshift [Px+1]`` (``trans_rr[a-1]``) and the
    masks ``b < a`` and ``b <= a`` of ``Q``."""
    S1, Q1 = 2 * Px + 1, Px + 1
    gate = lambda p, name: 9 * p + _GATE[name]  # noqa: E731
    qpos = lambda a, b: 9 * Px + a * Q1 + b  # noqa: E731
    one = qpos(0, 0)
    rows = ([(j, gate(j, "mark_r")) for j in range(Px)] + [(Px, one)]
            + [(j, gate(j, "trans_rd")) for j in range(Px)])  # (Q row, rowcoef)
    cols = ([(m + 1, gate(m, "source_r")) for m in range(Px)] + [(0, one)]
            + [(m + 1, gate(m, "trans_dr")) for m in range(Px)])  # (Q column, colcoef)
    diag = {}
    for j in range(Px):
        diag[(j, Px + 1 + j)] = gate(j, "mark_d")
        diag[(Px + 1 + j, j)] = gate(j, "source_d")
        diag[(Px + 1 + j, Px + 1 + j)] = gate(j, "trans_dd")
    f_a, f_q, f_c, qmap = [], [], [], []
    for r, (qa, rc) in enumerate(rows):
        for c, (qb, cc) in enumerate(cols):
            d = diag.get((r, c))
            f_a.append(rc if d is None else d)
            f_q.append(qpos(qa, qb) if d is None else one)
            f_c.append(cc if d is None else one)
            qmap.append(qpos(qa, qb))  # Q is 0 there on the diagonals
    coef = [rc for _, rc in rows] + [cc for _, cc in cols]
    amap = [qpos(qa, l + 1) for qa, _ in rows for l in range(Px)]
    bmap = [qpos(l, qb) for l in range(Px) for qb, _ in cols]
    diag_pos = [r * S1 + c for name in ("mark_d", "source_d", "trans_dd") for (r, c), gp in diag.items()
                if gp % 9 == _GATE[name]]
    tshift = [gate(max(a - 1, 0), "trans_rr") for a in range(Q1)]
    below = [[b < a for b in range(Q1)] for a in range(Q1)]
    lower = [[float(b <= a) for b in range(Q1)] for a in range(Q1)]
    return f_a + f_q + f_c, qmap + coef + amap + bmap, diag_pos, tshift, below, lower


def _row_index(Px: int, device, dtype):
    maps = _row_maps(Px)
    kinds = (torch.long,) * 4 + (torch.bool, dtype)
    return [_cached_index(("rows", Px, i), device, lambda i=i: maps[i], kind) for i, kind in enumerate(kinds)]


def _row_matrices(g: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every tile row solved in closed form (no graph; :class:`_TileBlocks` differentiates it).

    ``g [W, Py, Px * 9]`` (a row's gates, flat ``9 p + gate``, gate order of :func:`plstm_grid_tiled`) ->
    ``o [W, Py, (2Px+1)^2]`` (row-major ``[2Px+1, 2Px+1]``: rows marks at the row's ``Px`` nodes, its right
    edge leaving, its ``Px`` down edges leaving; columns its ``Px`` nodes, its left edge, its ``Px`` top
    edges) and ``V [W, Py, 9Px + (Px+1)^2]`` (``g`` and ``Q``, see :func:`_row_maps`), kept for the backward."""
    W, Py, P9 = g.shape
    Px = P9 // 9
    fwd, _, _, tshift, below, lower = _row_index(Px, g.device, g.dtype)
    t = _pick(g, tshift)  # [W, Py, Px+1]: trans_rr[a-1] at a
    one = _cached_index("one", g.device, lambda: 1, g.dtype)
    Q = torch.where(below, t[..., :, None], one).cumprod(dim=-2) * lower  # Q[a, b] = prod_{b <= l < a} trans_rr[l]
    V = torch.cat([g, Q.flatten(-2)], dim=-1)
    o = _pick(V, fwd).view(W, Py, 3, -1).prod(dim=-2)
    return o, V


def _row_matrices_backward(go: torch.Tensor, V: torch.Tensor, gdirect: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`_row_matrices`: ``go [W, Py, E]`` and the gradient ``gdirect [W, Py, Px]`` of the
    ``direct`` gate (not used by the row matrices) -> ``[W, Py, Px, 9]`` (all nine gates).

    With ``o = rowcoef * Qx * colcoef`` (``Qx = Q`` gathered, see :func:`_row_maps`): the coefficients get
    ``(go * Qx) @ colcoef`` and ``rowcoef @ (go * Qx)``; with ``g' = go * rowcoef * colcoef`` (the gradient
    of ``Qx``), ``trans_rr[l]`` gets ``sum_{a, b} Q[a, l+1] gQ[a, b] Q[l, b] = sum_r A[r, l] (g' B^T)[r, l]``
    (the product rule over the chain ``Q[a, b] = prod_{b <= l < a}``, no division: exact with zero
    transitions; entries that are not products, on and above the diagonal of ``Q``, drop out as ``A`` or
    ``B`` is 0 there); the diagonal gates get ``go`` on their diagonals."""
    W, Py, E = go.shape
    Px = (int(round(E ** 0.5)) - 1) // 2
    R1 = 2 * Px + 1
    _, bwd, diag, _, _, _ = _row_index(Px, go.device, go.dtype)
    parts = _pick(V, bwd).split([E, R1, R1, R1 * Px, Px * R1], dim=-1)
    Qx, rc, cc = parts[0].view(W, Py, R1, R1), parts[1], parts[2]
    A, B = parts[3].view(W, Py, R1, Px), parts[4].view(W, Py, Px, R1)
    g = go.view(W, Py, R1, R1)
    gqx = g * Qx
    g_rc = (gqx @ cc[..., :, None])[..., 0]  # [W, Py, R1]
    g_cc = (rc[..., None, :] @ gqx)[..., 0, :]  # [W, Py, S1]
    d_trr = (((g * rc[..., :, None] * cc[..., None, :]) @ B.transpose(-1, -2)) * A).sum(dim=-2)
    gd = _pick(go, diag).view(W, Py, 3, Px)  # mark_d, source_d, trans_dd
    parts = {"source_r": g_cc[..., :Px], "source_d": gd[..., 1, :], "trans_rr": d_trr, "trans_rd": g_rc[..., Px + 1:],
             "trans_dd": gd[..., 2, :], "trans_dr": g_cc[..., Px + 1:], "mark_r": g_rc[..., :Px],
             "mark_d": gd[..., 0, :], "direct": gdirect}
    return torch.stack([parts[name] for name in _GATE], dim=-1)


@functools.lru_cache(maxsize=64)
def _merge_maps(n: int, h: int, Px: int, final: bool):
    """Index maps of one strip merge (:func:`_strip_merge`) as a gather, and of its backward.

    Forward: the merged matrix (side ``R2 = 2(n+h) + Px``) is ``src[fwd]`` with ``src = [top, bot, x, (direct),
    0]`` (the pair of strips flat, ``x = bot[:, m:] @ top[m:, :]`` flat, ``m = n + h``; ``direct`` only when
    ``final``), flat row-major, or in :func:`_block_order` when ``final`` (then the ``direct`` gates sit on the
    node diagonal, where the merged matrix is structurally 0). Backward, from ``gout`` (its gradient, in the
    same order): ``gx = gout[xpos]`` and the pair's gradient ``[gout, bot[:, m:]^T gx, gx top[m:, :]^T, 0][inv]``
    (every entry of the pair is either placed once in the merged matrix or feeds ``x``, never both);
    ``dpos``: the direct gates' positions in ``gout`` (empty unless ``final``)."""
    m = n + h
    R, R2, N2 = m + Px, 2 * m + Px, 2 * n
    RC = R * R
    rows_top, rows_bot, cols_top, cols_bot = _merge_index(n, h, Px)
    nd = N2 if final else 0
    zero = 3 * RC + nd
    src = [zero] * (R2 * R2)
    for i, r in enumerate(rows_top):
        for j, c in enumerate(cols_top):
            src[r * R2 + c] = i * R + j
    for i, r in enumerate(rows_bot):
        for j, c in enumerate(cols_top):
            src[r * R2 + c] = 2 * RC + i * R + j
        for j, c in enumerate(cols_bot):
            src[r * R2 + c] = RC + i * R + j
    for i in range(nd):
        src[i * R2 + i] = 3 * RC + i
    return _gather_maps(src, R2, N2 if final else None, [rows_top, rows_bot], [cols_top, cols_bot], m, Px, R)


def _gather_maps(src, side, nodes, rows, cols, m, Px, R):
    """Shared part of :func:`_merge_maps` and :func:`_finish_maps`: output order, ``fwd``, ``xpos``, ``inv``,
    ``dpos`` (``rows``/``cols``: the merged positions of the top and bottom strips' rows and columns; ``nodes``:
    block order with that many nodes and the direct gates on their diagonal, ``None``: row-major)."""
    order = list(range(side * side)) if nodes is None else _block_order(side, nodes)
    pos = [0] * len(order)
    for k, p in enumerate(order):
        pos[p] = k
    fwd = [src[p] for p in order]
    diag = set() if nodes is None else {i * side + i for i in range(nodes)}
    S = side * side
    zero = S + 2 * Px * R
    inv = []
    if len(rows) == 2:  # a merge: top strip, then bottom strip
        for i in range(R):
            for j in range(R):
                p = rows[0][i] * side + cols[0][j] if i < m else None
                inv.append(S + (i - m) * R + j if p is None else zero if p in diag else pos[p])
        for i in range(R):
            for j in range(R):
                p = rows[1][i] * side + cols[1][j] if j < m else None
                inv.append(S + Px * R + i * Px + (j - m) if p is None else zero if p in diag else pos[p])
        xpos = [pos[r * side + c] for r in rows[1] for c in cols[0]]
    else:  # no merge: the matrix itself
        inv = [zero if p in diag else pos[p] for p in range(S)]
        xpos = []
    dpos = [pos[i * side + i] for i in range(nodes or 0)]
    return fwd, xpos, inv, dpos


@functools.lru_cache(maxsize=32)
def _finish_maps(R: int, N: int):
    """:func:`_merge_maps` for a tile of one row (no merge): the row matrix (side ``R``, ``N`` nodes) into
    block order with the direct gates on the node diagonal; ``src = [o, direct, 0]``."""
    src = list(range(R * R))
    for i in range(N):
        src[i * R + i] = R * R + i
    return _gather_maps(src, R, N, [None], [None], 0, 0, 0)


class _TileBlocks(torch.autograd.Function):
    """Tile matrices of power-of-two height as one autograd node: every row in closed form
    (:func:`_row_matrices`), then ``log2(Py)`` strip merges (:func:`_strip_merge`), each one matmul, one cat
    and one gather through a cached index map (:func:`_merge_maps`); the last gather writes the four blocks
    into one buffer and puts the ``direct`` gates on the diagonal of ``G``. Hand-written backward: per merge a
    gather, two matmuls, a cat and a gather; then :func:`_row_matrices_backward`.

    ``gates [W, Py, Px, 9]`` (gate order of :func:`plstm_grid_tiled`) -> ``G + diag(direct) [W, N, N]``,
    ``Min [W, N, A]``, ``Sout [W, A, N]``, ``Tb [W, A, A]`` (views of one buffer)."""

    @staticmethod
    def forward(ctx, gates):
        W, Py, Px, _ = gates.shape
        N, A = Py * Px, Py + Px
        o, V = _row_matrices(gates.reshape(W, Py, Px * 9))  # [W, Py, R*R]
        direct = gates[..., _GATE["direct"]].reshape(W, 1, N)
        levels, h, R, dev = [], 1, 2 * Px + 1, gates.device
        if Py == 1:
            fwd = _cached_index(("finish", R, Px, 0), dev, lambda: _finish_maps(R, Px)[0])
            o = _pick(torch.cat([o, direct, _zero(o, W, 1, 1)], dim=-1), fwd)
        while o.shape[1] > 1:
            n, c, final = h * Px, o.shape[1], o.shape[1] == 2
            key = ("merge", n, h, Px, final)
            fwd = _cached_index(key + (0,), dev, lambda: _merge_maps(n, h, Px, final)[0])
            pair = o.view(W, c // 2, 2, R, R)
            x = pair[:, :, 1, :, n + h:] @ pair[:, :, 0, n + h:, :]  # bottom rows through the top's down edges
            src = [o.view(W, c // 2, 2 * R * R), x.view(W, c // 2, R * R)] + ([direct] if final else [])
            levels.append((o, n, h, R))
            o = _pick(torch.cat(src + [_zero(o, W, c // 2, 1)], dim=-1), fwd)
            h, R = 2 * h, 2 * (n + h) + Px
        o = o.view(W, -1)
        ctx.set_materialize_grads(False)  # blocks nothing reads (one tile: Min, Sout, Tb) get no zero gradient
        ctx.save_for_backward(V, *[lv[0] for lv in levels])
        ctx.meta = ([lv[1:] for lv in levels], (W, Py, Px))
        return (o[:, :N * N].view(W, N, N), o[:, N * N:N * (N + A)].view(W, N, A),
                o[:, N * (N + A):N * (N + 2 * A)].view(W, A, N), o[:, N * (N + 2 * A):].view(W, A, A))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gG, gMin, gSout, gTb):
        V, *ins = ctx.saved_tensors
        nhR, (W, Py, Px) = ctx.meta
        N, A = Py * Px, Py + Px
        sizes = (N * N, N * A, A * N, A * A)
        g = torch.cat([_zero(V, W, k) if b is None else b.reshape(W, k) for b, k in zip((gG, gMin, gSout, gTb), sizes)],
                      dim=-1)[:, None]  # [W, 1, (N+A)^2] block order
        dev, gdirect = V.device, None
        for o, (n, h, R) in zip(reversed(ins), reversed(nhR)):
            c, final, m = o.shape[1], gdirect is None, n + h
            key = ("merge", n, h, Px, final)
            _, xpos, inv, dpos = (_cached_index(key + (i,), dev, lambda i=i: _merge_maps(n, h, Px, final)[i])
                                  for i in range(4))
            if final:
                gdirect = _pick(g, dpos)
            pair = o.view(W, c // 2, 2, R, R)
            gx = _pick(g, xpos).view(W, c // 2, R, R)
            g_top = pair[:, :, 1, :, m:].transpose(-1, -2) @ gx  # [., Px, R] the top strip's leaving down edges
            g_bot = gx @ pair[:, :, 0, m:, :].transpose(-1, -2)  # [., R, Px] the bottom strip's entering ones
            g = torch.cat([g, g_top.flatten(-2), g_bot.flatten(-2), _zero(g, W, c // 2, 1)], dim=-1)
            g = _pick(g, inv).view(W, c, R * R)
        if gdirect is None:  # one row: no merge
            R = 2 * Px + 1
            _, _, inv, dpos = (_cached_index(("finish", R, Px, i), dev, lambda i=i: _finish_maps(R, Px)[i])
                               for i in range(4))
            gdirect = _pick(g, dpos)
            g = _pick(torch.cat([g, _zero(g, W, 1, 1)], dim=-1), inv)
        return _row_matrices_backward(g, V, gdirect.view(W, Py, Px)).view(W, Py, Px, 9)


def tile_blocks_doubling(source_r, source_d, trans_rr, trans_rd, trans_dd, trans_dr, mark_r, mark_d):
    """The tile matrices as four blocks ``(G [W, N, N], Min [W, N, A], Sout [W, A, N], Tb [W, A, A])``
    (``Py`` a power of two): rows solved in closed form, then ``log2(Py)`` pairwise strip merges
    (:func:`_strip_merge`) in one autograd node (:class:`_TileBlocks`, here with ``direct = 0``)."""
    W, Py, Px = source_r.shape
    if Py & (Py - 1):
        raise ValueError(f"tile_matrices_doubling needs a power-of-two tile height, got {Py}")
    gates = (source_r, source_d, trans_rr, trans_rd, trans_dd, trans_dr, mark_r, mark_d)
    return _TileBlocks.apply(torch.stack(gates + (torch.zeros_like(source_r),), dim=-1))


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


def _gather_tiles(t: torch.Tensor, Py: int, Px: int, tys, txs) -> torch.Tensor:
    """``[B, Y, X, H, F]`` -> ``[T * B * H, Py * Px, F]`` (zero-padded to whole tiles), tiles in the order
    ``(tys, txs)`` (outermost), then batch, then head: one gather (a reshape for one tile)."""
    B, Y, X, H, f = t.shape
    nyt, nxt = -(-Y // Py), -(-X // Px)
    pad_y, pad_x = nyt * Py - Y, nxt * Px - X
    if pad_y or pad_x:
        t = F.pad(t, [0, 0, 0, 0, 0, pad_x, 0, pad_y])
    t = t.reshape(B, nyt, Py, nxt, Px, H, f).permute(1, 3, 0, 5, 2, 4, 6)  # [nyt, nxt, B, H, Py, Px, F] view
    if len(tys) == 1:
        return t.reshape(B * H, Py * Px, f)
    idx_y = _cached_index(("tys", tys), t.device, lambda: tys)
    idx_x = _cached_index(("txs", txs), t.device, lambda: txs)
    return t[idx_y, idx_x].reshape(len(tys) * B * H, Py * Px, f)


def _tile_positions(tys, txs, nxt: int, device) -> torch.Tensor:
    """``pos [nyt * nxt]`` int32: the storage position (anti-diagonal order) of every tile in row-major order."""
    return _cached_index(("inv", tys, txs), device,
                         lambda: sorted(range(len(tys)), key=lambda p: tys[p] * nxt + txs[p]))


def _scatter_tiles(t: torch.Tensor, B: int, H: int, Y: int, X: int, Py: int, Px: int, tys, txs) -> torch.Tensor:
    """Inverse of :func:`_gather_tiles`: ``[T * B * H, Py * Px, F]`` -> ``[B, Y, X, H, F]`` (padding cut)."""
    nyt, nxt = -(-Y // Py), -(-X // Px)
    f = t.shape[-1]
    t = t.reshape(len(tys), B, H, Py, Px, f)
    if len(tys) > 1:
        t = t[_tile_positions(tys, txs, nxt, t.device)]  # row-major -> position
    t = t.reshape(nyt, nxt, B, H, Py, Px, f)
    return t.permute(2, 0, 4, 1, 5, 3, 6).reshape(B, nyt * Py, nxt * Px, H, f)[:, :Y, :X]


class _Retile(torch.autograd.Function):
    """:func:`_gather_tiles` (``to_tiles``) or :func:`_scatter_tiles` as an autograd node whose backward is the
    other one: they are adjoint (a permutation with zero padding / cropping), so the backward is a gather, not
    autograd's zeros + accumulating ``index_put`` (a sort on CUDA). Twice differentiable.
    ``shape = (B, H, Y, X, Py, Px, tys, txs)``."""

    @staticmethod
    def forward(ctx, t, to_tiles, shape):
        ctx.meta = (to_tiles, shape)
        B, H, Y, X, Py, Px, tys, txs = shape
        return _gather_tiles(t, Py, Px, tys, txs) if to_tiles else _scatter_tiles(t, *shape)

    @staticmethod
    def backward(ctx, g):
        to_tiles, shape = ctx.meta
        return _Retile.apply(g, not to_tiles, shape), None, None


def _to_tiles(t: torch.Tensor, Py: int, Px: int, tys, txs) -> torch.Tensor:
    """``[B, Y, X, H, F]`` -> ``[T * B * H, Py * Px, F]``: :func:`_gather_tiles`, differentiated by
    :func:`_scatter_tiles` (one tile: plain autograd through a reshape, no op in the backward)."""
    if len(tys) == 1:
        return _gather_tiles(t, Py, Px, tys, txs)
    B, Y, X, H, _ = t.shape
    return _Retile.apply(t, True, (B, H, Y, X, Py, Px, tys, txs))


def _from_tiles(t: torch.Tensor, B: int, H: int, Y: int, X: int, Py: int, Px: int, tys, txs) -> torch.Tensor:
    """Inverse of :func:`_to_tiles`: ``[T * B * H, Py * Px, F]`` -> ``[B, Y, X, H, F]``."""
    shape = (B, H, Y, X, Py, Px, tys, txs)
    return _scatter_tiles(t, *shape) if len(tys) == 1 else _Retile.apply(t, False, shape)


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
    if Py & (Py - 1) == 0:  # G + diag(direct) [W, N, N], Min [W, N, A], Sout [W, A, N], Tb [W, A, A]
        G, Min, Sout, Tb = _TileBlocks.apply(gates.view(W, Py, Px, 9))
    else:  # the row DP; one unbind (one stack in the backward) instead of nine selects
        *tiled, direct = (t.view(W, Py, Px) for t in gates.unbind(-1))
        G, Min, Sout, Tb = tile_blocks(*tiled)
        G = G + torch.diag_embed(direct.view(W, N))  # G is 0 on its diagonal (no path from a node to itself)
    qk = torch.bmm(Qw, Kw.transpose(1, 2))  # [W, N, N]
    y = torch.bmm(qk * G, Vw)  # intra-tile paths and the direct term d_n (q_n . k_n) v_n
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
