"""Normalisations shared by the layers and models: per-head output RMSNorm, plain RMSNorm."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["MultiHeadRMSNorm", "RMSNorm"]


class MultiHeadRMSNorm(nn.Module):
    """RMSNorm over the last axis of every head separately, with a learned ``[H, V]`` scale.

    Computed in at least float32 (also under autocast); float64 stays float64.
    Shapes: ``[..., H, V] -> [..., H, V]``.

    Example:
        >>> import torch
        >>> MultiHeadRMSNorm(2, 4)(torch.randn(3, 2, 4)).shape
        torch.Size([3, 2, 4])
    """

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.num_heads, self.head_dim, self.eps = num_heads, head_dim, eps
        self.weight = nn.Parameter(torch.ones(num_heads, head_dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        y32 = y.float() if y.dtype in (torch.float16, torch.bfloat16) else y
        # y * rsqrt(mean(y^2) + eps) over V: torch's rms_norm (one fused kernel on CUDA, forward and backward,
        # instead of five and ~14 launches; the same formula as a composite on CPU), then the [H, V] scale
        y32 = nn.functional.rms_norm(y32, (self.head_dim,), eps=self.eps)
        return (y32 * self.weight.to(y32.dtype)).to(y.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis with a learned scale (``torch.nn.RMSNorm`` exists only from torch 2.4).

    Shapes: ``[..., dim] -> [..., dim]``.

    Example:
        >>> import torch
        >>> RMSNorm(8)(torch.randn(2, 8)).shape
        torch.Size([2, 8])
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
