"""2D pLSTM layer for images / token grids ``[B, Y, X, dim]`` (SPEC section 5, PAPERS.md section 1.5).

Four orientations (right+down, left+down, right+up, left+up) run as one batched :func:`plstm_grid` call on
flipped inputs, and their outputs are **summed**. Since the operator is linear in its gating matrix, this is
exactly the paper's fused form (sum of the four orientations' gating matrices, one attention pass);
``direct`` is given to orientation 0 only so that the node's own ``q.k v`` term is counted once.

Gate parametrisations (per orientation and head, from a linear map of the node's input; weights start at
zero as in the paper's arrow runs, biases as in its Table 4/5):

**P-mode** (directed propagation, SPEC section 3): with an angle ``alpha = sigmoid(b_alpha + W x)`` (the
bias spread over heads in ``[-2, 2]``) and a magnitude ``tau = tanh(5 (b_tau + W x))`` (``b_tau = 1``),

    [[trans_rr, trans_dr],      = tau * [[alpha,     alpha    ],      (rows: leaving right / down edge,
     [trans_rd, trans_dd]]               [1 - alpha, 1 - alpha]]       columns: entering left / top edge)

    source_r = alpha * s,   source_d = (1 - alpha) * s,   s = sigmoid(-4 + W x)

Each column's absolute sum is ``|tau| <= 1`` for *every* input, and the sources' absolute sum is ``s <= 1``,
so P-mode's bound holds by construction. This is the paper's eq. 10 with the decay ``gamma`` taken as
``tau``. We deliberately do not copy the public code's ``1 - alpha * tau`` / ``1 - alpha * S`` form (PAPERS.md
section 4 item 5): with ``tau < 0`` its column sums exceed 1, and its down source is ~1 whatever ``S`` says.

**D-mode** (diffusive distribution): ``trans_rd = 0`` (a right edge never turns down), which makes the line
graph a multitree; the other three are independent ``tanh`` gates (``|T| <= 1``), sources sigmoid.

Marks (one per node, shared by both entering edges, as in the paper's code) and ``direct`` are sigmoid
(biases -4 and -6). ``q`` is scaled by ``K^-1/2``. Outputs go through a per-head RMSNorm, then ``out``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import nn

from ..ops.grid import plstm_grid
from .norm import MultiHeadRMSNorm

__all__ = ["PLSTM2DLayer"]


_P_GATES = ("source", "alpha", "tau", "mark", "direct")
_D_GATES = ("source_r", "source_d", "trans_rr", "trans_dd", "trans_dr", "mark", "direct")
_BIAS = {"source": -4.0, "source_r": -4.0, "source_d": -4.0, "mark": -4.0, "direct": -6.0,
         "tau": 1.0, "trans_rr": 1.0, "trans_dd": 1.0, "trans_dr": 1.0}


def _flip(t: torch.Tensor, orientation: int) -> torch.Tensor:
    """Orientation 0: right+down (identity); 1: flip X (left+down); 2: flip Y (right+up); 3: both.
    ``t: [B, Y, X, ...]``; each flip is its own inverse."""
    dims = [d for d, on in ((2, orientation & 1), (1, orientation & 2)) if on]
    return t.flip(dims) if dims else t


class PLSTM2DLayer(nn.Module):
    """pLSTM token mixer on a 2D grid, four orientations, P- or D-mode.

    Shapes:
        x: ``[B, Y, X, dim]`` -> ``[B, Y, X, dim]``. Any ``Y, X`` (the layer has no size-bound parameter).

    Args:
        dim: model width; ``dim % num_heads == 0``; head dim ``K = V = dim // num_heads``.
        num_heads: ``H``.
        mode: ``"P"`` (directed propagation) or ``"D"`` (diffusive, multitree).
        transition_scale: the ``5`` in ``tanh(5 (b + W x))``.
        backend, tile: passed to :func:`plstm_graph.ops.grid.plstm_grid`.

    Example:
        >>> import torch
        >>> layer = PLSTM2DLayer(dim=32, num_heads=4, mode="P")
        >>> layer(torch.randn(2, 6, 9, 32)).shape
        torch.Size([2, 6, 9, 32])
    """

    def __init__(self, dim: int, num_heads: int, mode: str = "P", transition_scale: float = 5.0,
                 backend: str = "auto", tile: Optional[Union[int, Tuple[int, int]]] = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if mode not in ("P", "D"):
            raise ValueError(f"mode must be 'P' or 'D', got {mode!r}")
        self.dim, self.num_heads, self.mode = dim, num_heads, mode
        self.head_dim = dim // num_heads
        self.transition_scale = transition_scale
        self.backend, self.tile = backend, tile
        self.gate_names = _P_GATES if mode == "P" else _D_GATES
        self.qkv = nn.Linear(dim, 3 * dim)
        # one gate value per (gate kind, orientation, head)
        self.gates = nn.Linear(dim, len(self.gate_names) * 4 * num_heads)
        self.norm = MultiHeadRMSNorm(num_heads, self.head_dim)
        self.out = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.zeros_(self.qkv.bias)
        nn.init.xavier_uniform_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        nn.init.zeros_(self.gates.weight)
        H = self.num_heads
        bias = torch.zeros(len(self.gate_names), 4, H)
        for i, name in enumerate(self.gate_names):
            if name == "alpha":  # angles spread over heads; logit of the right-vs-down split
                bias[i] = torch.linspace(-2.0, 2.0, H) if H > 1 else 0.0
            else:  # transitions: b = 1 inside tanh(5 (b + W x)), i.e. near criticality at init
                bias[i] = _BIAS[name]
        with torch.no_grad():
            self.gates.bias.copy_(bias.reshape(-1))
        self.norm.weight.data.fill_(1.0)

    def grid_gates(self, x: torch.Tensor):
        """The nine operator gates per orientation: list of nine ``[4, B, Y, X, H]`` tensors, in the argument
        order of :func:`plstm_grid` (``source_r, source_d, trans_rr, trans_rd, trans_dd, trans_dr, mark_r,
        mark_d, direct``), in *unflipped* node coordinates."""
        B, Y, X, _ = x.shape
        raw = self.gates(x).view(B, Y, X, len(self.gate_names), 4, self.num_heads)
        raw = raw.permute(3, 4, 0, 1, 2, 5)  # [G, 4, B, Y, X, H]
        g = dict(zip(self.gate_names, raw.unbind(0)))
        c = self.transition_scale
        if self.mode == "P":
            alpha = torch.sigmoid(g["alpha"])
            tau = torch.tanh(c * g["tau"])
            s = torch.sigmoid(g["source"])
            source_r, source_d = alpha * s, (1 - alpha) * s
            trans_rr = trans_dr = tau * alpha
            trans_rd = trans_dd = tau * (1 - alpha)
        else:
            source_r, source_d = torch.sigmoid(g["source_r"]), torch.sigmoid(g["source_d"])
            trans_rr, trans_dd, trans_dr = (torch.tanh(c * g[n]) for n in ("trans_rr", "trans_dd", "trans_dr"))
            trans_rd = torch.zeros_like(trans_rr)
        mark = torch.sigmoid(g["mark"])
        direct = torch.sigmoid(g["direct"])
        direct = direct * torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=direct.dtype,
                                       device=direct.device).view(4, 1, 1, 1, 1)
        return [source_r, source_d, trans_rr, trans_rd, trans_dd, trans_dr, mark, mark, direct]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape [B, Y, X, {self.dim}], got {list(x.shape)}")
        B, Y, X, _ = x.shape
        H, K = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, Y, X, 3, H, K).unbind(3)  # [B, Y, X, H, K] each
        q = q * K ** -0.5
        gates = self.grid_gates(x)
        # stack the 4 orientations along the batch axis, each flipped so that it runs right+down
        flip4 = lambda t, per_o=False: torch.cat(  # noqa: E731
            [_flip(t[o] if per_o else t, o) for o in range(4)], dim=0)
        y = plstm_grid(flip4(q), flip4(k), flip4(v), *[flip4(g, per_o=True) for g in gates],
                       backend=self.backend, tile=self.tile)  # [4B, Y, X, H, K]
        y = sum(_flip(part, o) for o, part in enumerate(y.split(B, dim=0)))
        return self.out(self.norm(y).reshape(B, Y, X, self.dim))
