"""Graph-level readouts: ``forward(x [N, dim], batch_vec [N], num_graphs) -> [B, dim]``.

Empty graphs read out zeros. All are plain ``index_add`` (no torch_scatter needed).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["SumReadout", "MeanReadout", "AttentionReadout", "make_readout"]


def _num_graphs(batch_vec: torch.Tensor, num_graphs: Optional[int]) -> int:
    if num_graphs is not None:
        return int(num_graphs)
    return int(batch_vec.max()) + 1 if batch_vec.numel() else 0


class SumReadout(nn.Module):
    """``out[g] = sum_{n in g} x_n``. Shapes: ``[N, D], [N] -> [B, D]``.

    Example:
        >>> import torch
        >>> SumReadout()(torch.ones(3, 2), torch.tensor([0, 0, 1]), 2).tolist()
        [[2.0, 2.0], [1.0, 1.0]]
    """

    def forward(self, x: torch.Tensor, batch_vec: torch.Tensor, num_graphs: Optional[int] = None) -> torch.Tensor:
        b = _num_graphs(batch_vec, num_graphs)
        return x.new_zeros(b, x.size(-1)).index_add(0, batch_vec, x)


class MeanReadout(nn.Module):
    """``out[g] = mean_{n in g} x_n`` (zeros for an empty graph). Shapes: ``[N, D], [N] -> [B, D]``.

    Example:
        >>> import torch
        >>> MeanReadout()(torch.tensor([[1.0], [3.0], [5.0]]), torch.tensor([0, 0, 1]), 2).tolist()
        [[2.0], [5.0]]
    """

    def forward(self, x: torch.Tensor, batch_vec: torch.Tensor, num_graphs: Optional[int] = None) -> torch.Tensor:
        b = _num_graphs(batch_vec, num_graphs)
        total = x.new_zeros(b, x.size(-1)).index_add(0, batch_vec, x)
        count = torch.zeros(b, dtype=x.dtype, device=x.device).index_add(
            0, batch_vec, torch.ones_like(batch_vec, dtype=x.dtype))
        return total / count.clamp(min=1)[:, None]


class AttentionReadout(nn.Module):
    """Gated attention pooling: ``a_n = softmax_{n in g}(w^T x_n)``, ``out[g] = sum_n a_n * (W x_n)``.

    Multi-head: the ``dim`` channels are split into ``num_heads`` groups with one attention score each.
    Shapes: ``[N, D], [N] -> [B, D]``.

    Example:
        >>> import torch
        >>> AttentionReadout(4)(torch.randn(5, 4), torch.tensor([0, 0, 1, 1, 1]), 2).shape
        torch.Size([2, 4])
    """

    def __init__(self, dim: int, num_heads: int = 1):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.score = nn.Linear(dim, num_heads)
        self.value = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.score.weight)  # uniform attention (mean pooling) at init
        nn.init.zeros_(self.score.bias)
        self.value.reset_parameters()

    def forward(self, x: torch.Tensor, batch_vec: torch.Tensor, num_graphs: Optional[int] = None) -> torch.Tensor:
        b, h = _num_graphs(batch_vec, num_graphs), self.num_heads
        s = self.score(x)
        s = s.float() if s.dtype in (torch.float16, torch.bfloat16) else s  # [N, h]
        smax = torch.full((b, h), float("-inf"), device=x.device, dtype=s.dtype).scatter_reduce(
            0, batch_vec[:, None].expand(-1, h), s, "amax", include_self=True)
        w = torch.exp(s - smax[batch_vec])  # [N, h], <= 1
        denom = torch.zeros(b, h, device=x.device, dtype=s.dtype).index_add(0, batch_vec, w)
        a = (w / denom[batch_vec]).to(x.dtype)  # [N, h]
        val = self.value(x).view(x.size(0), h, -1) * a[:, :, None]  # [N, h, D/h]
        return val.new_zeros(b, h, val.size(-1)).index_add(0, batch_vec, val).reshape(b, -1)


def make_readout(name: str, dim: int, num_heads: int = 1) -> nn.Module:
    """``"sum"``, ``"mean"`` or ``"attention"``."""
    if name == "sum":
        return SumReadout()
    if name == "mean":
        return MeanReadout()
    if name == "attention":
        return AttentionReadout(dim, num_heads)
    raise ValueError(f"readout must be 'sum', 'mean' or 'attention', got {name!r}")
