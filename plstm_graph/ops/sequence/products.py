"""Exact segment products of a gate sequence, the building block of the parallel and chunkwise forms.

``segment_products(x)[..., i, j] = prod_{j < p <= i} x[..., p]`` for ``i >= j`` (1 on the diagonal), 0 above.

Gates may be negative or exactly zero, so no logarithms are taken: the forward is a masked ``cumprod``
(exact up to rounding, signs and zeros included) and the backward is division-free,

    d M[i, j] / d x_p = [j < p <= i] * M[p-1, j] * M[i, p]
    =>  grad_x[p] = sum_j M[p-1, j] * (M^T G)[p, j]

one matmul per segment, with no host synchronisation (``torch.cumprod``'s own backward checks the input
for zeros with a ``.item()``).
"""
from __future__ import annotations

import torch

__all__ = ["segment_products"]


class _SegmentProducts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        idx = torch.arange(n, device=x.device)
        upper = idx[None, :] > idx[:, None]  # [m, p]: p > m
        rows = torch.where(upper, x[..., None, :], torch.ones((), dtype=x.dtype, device=x.device))
        cum = rows.cumprod(-1)  # cum[m, p] = prod_{m < p' <= p} x_p'   (1 for p <= m)
        out = cum.transpose(-1, -2).tril()  # out[i, j] = cum[j, i] for i >= j
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        shifted = torch.nn.functional.pad(out[..., :-1, :], (0, 0, 1, 0))  # shifted[p, j] = M[p-1, j]
        r = out.transpose(-1, -2) @ grad  # r[p, j] = sum_i M[i, p] G[i, j]
        return (shifted * r).sum(-1)


def segment_products(x: torch.Tensor) -> torch.Tensor:
    """Lower-triangular matrix of products of ``x`` over half-open segments ``(j, i]``.

    Shapes:
        x: ``[..., n]`` -> ``[..., n, n]``.

    Example:
        >>> import torch
        >>> segment_products(torch.tensor([5.0, 2.0, -3.0]))
        tensor([[ 1.,  0.,  0.],
                [ 2.,  1.,  0.],
                [-6., -3.,  1.]])
    """
    return _SegmentProducts.apply(x)
