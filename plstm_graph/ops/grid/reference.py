"""Readable reference of the 2D-grid pLSTM operator (SPEC section 5): one node at a time, row-major.

The oracle of the grid tests. Plain autograd-differentiable PyTorch, fine in float64, slow (a Python loop
over the Y * X nodes). With ``R[y][x]`` the state on the right edge ``r(x, y) = (x, y) -> (x+1, y)`` and
``D[y][x]`` the state on the down edge ``d(x, y) = (x, y) -> (x, y+1)``, every gate read at node ``(x, y)``:

    left = R[y][x-1]  (0 when x == 0)        top = D[y-1][x]  (0 when y == 0)
    R[y][x] = source_r * (k outer v) + trans_rr * left + trans_dr * top
    D[y][x] = source_d * (k outer v) + trans_rd * left + trans_dd * top
    y[y][x] = q^T (mark_r * left + mark_d * top) + direct * (q . k) * v

Gates that refer to an edge outside the grid multiply a zero state (``x == 0`` / ``y == 0``) or produce a
state nobody reads (``source_r`` at ``x == X-1``, ``source_d`` at ``y == Y-1``), so they are ignored.
"""
from __future__ import annotations

import torch

__all__ = ["plstm_grid_reference"]


def plstm_grid_reference(q, k, v, source_r, source_d, trans_rr, trans_rd, trans_dd, trans_dr, mark_r, mark_d,
                         direct) -> torch.Tensor:
    """Shapes: q, k ``[B, Y, X, H, K]``; v ``[B, Y, X, H, V]``; every gate ``[B, Y, X, H]``;
    returns ``[B, Y, X, H, V]`` in ``v``'s dtype (computed in at least float32)."""
    out_dtype = v.dtype
    acc = torch.promote_types(v.dtype, torch.float32)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    g = [t.to(acc)[..., None, None] for t in (source_r, source_d, trans_rr, trans_rd, trans_dd, trans_dr,
                                             mark_r, mark_d)]
    sr, sd, trr, trd, tdd, tdr, mr, md = g
    B, Y, X, H, K = q.shape
    zero = q.new_zeros(B, H, K, v.shape[-1])
    R = [[None] * X for _ in range(Y)]
    D = [[None] * X for _ in range(Y)]
    rows = []
    for y in range(Y):
        row = []
        for x in range(X):
            left = R[y][x - 1] if x > 0 else zero  # state of r(x-1, y)   [B, H, K, V]
            top = D[y - 1][x] if y > 0 else zero  # state of d(x, y-1)
            kv = k[:, y, x, :, :, None] * v[:, y, x, :, None, :]
            R[y][x] = sr[:, y, x] * kv + trr[:, y, x] * left + tdr[:, y, x] * top
            D[y][x] = sd[:, y, x] * kv + trd[:, y, x] * left + tdd[:, y, x] * top
            read = mr[:, y, x] * left + md[:, y, x] * top
            out = torch.einsum("bhk,bhkv->bhv", q[:, y, x], read)
            out = out + direct[:, y, x, :, None].to(acc) * (q[:, y, x] * k[:, y, x]).sum(-1, keepdim=True) * v[:, y, x]
            row.append(out)
        rows.append(torch.stack(row, dim=1))  # [B, X, H, V]
    return torch.stack(rows, dim=1).to(out_dtype)
