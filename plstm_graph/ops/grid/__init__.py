"""The pLSTM operator on a 2D grid (SPEC section 5): public function, backend choice, input checks.

One orientation (right + down edges). A vision layer runs the four orientations on flipped inputs.
The grid operator is ``plstm_dag`` on the grid DAG (:func:`grid_dag`); the tests prove it.

Backends (``backend=``):

* ``"reference"``: :mod:`.reference`, one node at a time; the oracle of the tests.
* ``"tiled"``: :mod:`.tiled`, matmul-dominated per-tile gating matrices plus a wavefront over tiles
  (``tile=(Py, Px)``; default :func:`default_tile`: one tile up to 16 x 16, tiles of 8 beyond). On float32 CUDA
  tensors the tile <-> boundary contractions run in fused Triton kernels (:mod:`plstm_graph.kernels.grid`).
* ``"auto"``: ``"tiled"``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch

from .dag import GridDAG, grid_dag
from .reference import plstm_grid_reference
from .tiled import default_tile, plstm_grid_tiled

__all__ = ["plstm_grid", "grid_backends", "grid_dag", "GridDAG", "plstm_grid_reference", "plstm_grid_tiled",
           "default_tile"]

_BACKENDS = ("reference", "tiled")
_GATES = ("source_r", "source_d", "trans_rr", "trans_rd", "trans_dd", "trans_dr", "mark_r", "mark_d", "direct")


def grid_backends() -> List[str]:
    """Backends of :func:`plstm_grid` usable on this machine."""
    return list(_BACKENDS)


def _check(q, k, v, gates) -> None:
    if q.dim() != 5 or k.dim() != 5 or v.dim() != 5:
        raise ValueError(
            "q, k, v must be [B, Y, X, H, K], [B, Y, X, H, K], [B, Y, X, H, V]; "
            f"got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}"
        )
    if k.shape != q.shape or v.shape[:4] != q.shape[:4]:
        raise ValueError(f"q, k, v disagree: {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if min(q.shape[:4]) < 1:
        raise ValueError(f"empty grid: q has shape {list(q.shape)}")
    for name, g in zip(_GATES, gates):
        if tuple(g.shape) != tuple(q.shape[:4]):
            raise ValueError(f"{name} has shape {list(g.shape)}, expected [B, Y, X, H] = {list(q.shape[:4])}")
        if g.device != q.device:
            raise ValueError(f"{name} is on {g.device} but q is on {q.device}")


def plstm_grid(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    source_r: torch.Tensor,
    source_d: torch.Tensor,
    trans_rr: torch.Tensor,
    trans_rd: torch.Tensor,
    trans_dd: torch.Tensor,
    trans_dr: torch.Tensor,
    mark_r: torch.Tensor,
    mark_d: torch.Tensor,
    direct: torch.Tensor,
    backend: str = "auto",
    tile: Optional[Union[int, Tuple[int, int]]] = None,
    use_triton: Optional[bool] = None,
) -> torch.Tensor:
    """pLSTM on a 2D grid, one orientation (SPEC section 5). No scaling inside (scale ``q`` first).

    Node ``(x, y)``; right edge ``r(x, y) = (x, y) -> (x+1, y)``, down edge ``d(x, y) = (x, y) -> (x, y+1)``.
    All gates are read at node ``(x, y)``: ``source_r/d`` put ``k v^T`` on ``r(x, y)`` / ``d(x, y)``;
    ``trans_rr: r(x-1,y) -> r(x,y)``, ``trans_rd: r(x-1,y) -> d(x,y)``, ``trans_dd: d(x,y-1) -> d(x,y)``,
    ``trans_dr: d(x,y-1) -> r(x,y)``; ``mark_r`` reads ``r(x-1, y)``, ``mark_d`` reads ``d(x, y-1)``:

    .. math::
        y_{xy} = q_{xy}^\\top(m^r_{xy} C_{r(x-1,y)} + m^d_{xy} C_{d(x,y-1)}) + d_{xy}(q_{xy}\\cdot k_{xy}) v_{xy}

    Gates referring to an edge outside the grid are ignored (their gradient is zero).

    Shapes:
        q, k: ``[B, Y, X, H, K]``; v: ``[B, Y, X, H, V]``; every gate: ``[B, Y, X, H]``;
        returns ``y: [B, Y, X, H, V]`` in ``v``'s dtype (half inputs are computed in float32).

    Args:
        backend: ``"auto"`` (= ``"tiled"``), ``"tiled"`` or ``"reference"``.
        tile: ``tiled`` only: tile side ``P`` or ``(Py, Px)``, capped at the grid size; default
            :func:`default_tile`. ``1`` is the node-level anti-diagonal wavefront. Power-of-two heights
            build the tile matrices in ``log2(Py)`` steps, others in ``Py`` steps.
        use_triton: ``tiled`` only: the tile <-> boundary contractions in fused Triton kernels. ``None``
            (default) = on float32 CUDA tensors when triton is installed; ``True`` = always (ValueError where
            unsupported; CPU tensors need ``TRITON_INTERPRET=1``); ``False`` = plain torch.

    Example:
        >>> import torch
        >>> from plstm_graph.ops.grid import plstm_grid
        >>> B, Y, X, H, K = 2, 5, 7, 3, 8
        >>> q, k, v = (torch.randn(B, Y, X, H, K) for _ in range(3))
        >>> gates = [torch.rand(B, Y, X, H) for _ in range(9)]
        >>> plstm_grid(q, k, v, *gates).shape
        torch.Size([2, 5, 7, 3, 8])
    """
    gates = (source_r, source_d, trans_rr, trans_rd, trans_dd, trans_dr, mark_r, mark_d, direct)
    _check(q, k, v, gates)
    if backend == "auto":
        backend = "tiled"
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(_BACKENDS) + ['auto']}")
    if backend == "reference":
        return plstm_grid_reference(q, k, v, *gates)
    Y, X = q.shape[1], q.shape[2]
    if tile is None:
        tile = default_tile(Y, X)
    else:
        if isinstance(tile, int):
            tile = (tile, tile)
        if len(tile) != 2 or min(tile) < 1:
            raise ValueError(f"tile must be a positive int or a pair (Py, Px), got {tile!r}")
        tile = (min(int(tile[0]), Y), min(int(tile[1]), X))
    out_dtype = v.dtype
    acc = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
    args = [t.to(acc) for t in (q, k, v) + gates]
    return plstm_grid_tiled(*args, tile=tile, use_triton=use_triton).to(out_dtype)
