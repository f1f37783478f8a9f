"""Vision models on patch grids: the pLSTM vision model (pLSTM-Vis) and a small ViT baseline.

Both: patch embedding (a strided conv), a learnable position embedding for the training grid that is
bicubically resized to any other grid at inference (as in the paper's arrow-pointing runs), pre-norm
residual blocks, pooling, a linear head. The pLSTM model's token mixer is :class:`PLSTM2DLayer`, alternating
P-mode and D-mode layers; the ViT's is multi-head self-attention. Images ``[B, C, H_img, W_img]`` of any size
divisible by the patch size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.grid import PLSTM2DLayer
from ..nn.norm import RMSNorm

__all__ = ["PLSTMVisionModel", "ViT"]


class _MLP(nn.Sequential):
    def __init__(self, dim: int, ratio: float) -> None:
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class _PatchGrid(nn.Module):
    """Patch embedding + resizable position embedding: ``[B, C, H, W] -> [B, Y, X, dim]``."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int, pos_embedding: bool) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        side = image_size // patch_size
        self.pos = nn.Parameter(torch.randn(1, dim, side, side) * 0.02) if pos_embedding else None

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if img.dim() != 4 or img.shape[-1] % self.patch_size or img.shape[-2] % self.patch_size:
            raise ValueError(f"expected images [B, C, H, W] with H, W multiples of {self.patch_size}, "
                             f"got {list(img.shape)}")
        x = self.proj(img)  # [B, dim, Y, X]
        if self.pos is not None:
            pos = self.pos
            if pos.shape[-2:] != x.shape[-2:]:
                pos = F.interpolate(pos, size=x.shape[-2:], mode="bicubic", align_corners=False)
            x = x + pos
        return x.permute(0, 2, 3, 1)  # [B, Y, X, dim]


class _Block(nn.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, mixer: nn.Module, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1, self.mixer = RMSNorm(dim), mixer
        self.norm2, self.mlp = RMSNorm(dim), _MLP(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _pool(x: torch.Tensor, pool: str) -> torch.Tensor:
    """``[B, Y, X, dim]`` -> ``[B, 4 dim]`` (corners: concat of the four corner tokens) or ``[B, dim]``."""
    if pool == "corners":
        return torch.cat([x[:, 0, 0], x[:, 0, -1], x[:, -1, 0], x[:, -1, -1]], dim=-1)
    return x.mean(dim=(1, 2))


class PLSTMVisionModel(nn.Module):
    """pLSTM vision model: patch grid -> ``2 * num_blocks`` pLSTM blocks (P, D, P, D, ...) -> pool -> head.

    Shapes:
        images ``[B, C, H, W]`` (any ``H, W`` divisible by ``patch_size``) -> logits ``[B, num_classes]``.

    Args:
        image_size: training resolution (sets the stored position-embedding grid).
        num_blocks: number of (P-mode block, D-mode block) pairs, as in the paper's config.
        pool: ``"corners"`` (the paper's: the four corner tokens, where the four orientations end) or
            ``"mean"``.
        tile: forwarded to the grid operator (``None``: its default).

    Example:
        >>> import torch
        >>> m = PLSTMVisionModel(image_size=32, patch_size=4, dim=32, num_heads=2, num_blocks=1, num_classes=2)
        >>> m(torch.randn(2, 3, 32, 32)).shape, m(torch.randn(1, 3, 64, 48)).shape
        (torch.Size([2, 2]), torch.Size([1, 2]))
    """

    def __init__(self, image_size: int = 32, patch_size: int = 4, in_channels: int = 3, dim: int = 64,
                 num_heads: int = 4, num_blocks: int = 2, num_classes: int = 2, mlp_ratio: float = 4.0,
                 pool: str = "corners", pos_embedding: bool = True, tile=None) -> None:
        super().__init__()
        if pool not in ("corners", "mean"):
            raise ValueError(f"pool must be 'corners' or 'mean', got {pool!r}")
        self.pool = pool
        self.embed = _PatchGrid(image_size, patch_size, in_channels, dim, pos_embedding)
        self.blocks = nn.ModuleList(
            _Block(dim, PLSTM2DLayer(dim, num_heads, mode="P" if i % 2 == 0 else "D", tile=tile), mlp_ratio)
            for i in range(2 * num_blocks)
        )
        self.norm = RMSNorm(dim * 4 if pool == "corners" else dim)
        self.head = nn.Linear(dim * 4 if pool == "corners" else dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(_pool(x, self.pool)))


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, dim]
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # [B, H, T, D/H]
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class ViT(nn.Module):
    """A small pre-norm Vision Transformer baseline with the same embedding, blocks and pooling options.

    Shapes:
        images ``[B, C, H, W]`` -> logits ``[B, num_classes]``.

    Args:
        pool: ``"mean"`` (default) or ``"corners"``.

    Example:
        >>> import torch
        >>> ViT(image_size=32, patch_size=4, dim=32, num_heads=2, depth=2)(torch.randn(2, 3, 48, 48)).shape
        torch.Size([2, 2])
    """

    def __init__(self, image_size: int = 32, patch_size: int = 4, in_channels: int = 3, dim: int = 64,
                 num_heads: int = 4, depth: int = 4, num_classes: int = 2, mlp_ratio: float = 4.0,
                 pool: str = "mean") -> None:
        super().__init__()
        if pool not in ("corners", "mean"):
            raise ValueError(f"pool must be 'corners' or 'mean', got {pool!r}")
        self.pool = pool
        self.embed = _PatchGrid(image_size, patch_size, in_channels, dim, True)
        self.blocks = nn.ModuleList(_Block(dim, _Attention(dim, num_heads), mlp_ratio) for _ in range(depth))
        self.norm = RMSNorm(dim * 4 if pool == "corners" else dim)
        self.head = nn.Linear(dim * 4 if pool == "corners" else dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        B, Y, X, D = x.shape
        x = x.reshape(B, Y * X, D)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(_pool(x.view(B, Y, X, D), self.pool)))
