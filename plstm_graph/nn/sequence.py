"""Sequence layers: RetNet's multi-scale retention and a 1D pLSTM layer with data-dependent gates.

Both run :func:`plstm_graph.plstm_sequence` (chunkwise for training, parallel on request) and have a
``step`` for O(1)-state decoding, which reproduces ``forward`` token by token.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.sequence import _retention_gates, plstm_sequence, plstm_sequence_step, retention

__all__ = ["MultiScaleRetention", "PLSTM1DLayer", "HeadRMSNorm", "rotary_angles", "apply_rotary"]


class HeadRMSNorm(nn.Module):
    """RMSNorm over the last axis of ``[..., H, D]`` per head, no affine parameters (torchscale's
    "GroupNorm" of retention; PAPERS.md 3.5), computed in float32."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotary_angles(head_dim: int, positions: torch.Tensor, dtype=torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """RetNet/torchscale rotation: angle ``1 / 10000^linspace(0, 1, D/2)`` per interleaved pair.

    Shapes: positions ``[T]`` -> ``(cos, sin)`` each ``[T, 1, D]`` (broadcast over heads)."""
    if head_dim % 2:
        raise ValueError(f"rotary position rotation needs an even key head dim, got {head_dim}")
    freq = 1.0 / 10000 ** torch.linspace(0, 1, head_dim // 2, dtype=torch.float64, device=positions.device)
    freq = freq.repeat_interleave(2)  # [D]
    angle = positions.to(torch.float64)[:, None] * freq[None, :]
    return angle.cos().to(dtype)[:, None, :], angle.sin().to(dtype)[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs ``(x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)``; x ``[..., T, H, D]``."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
    return (x * cos + rotated * sin).to(x.dtype)


class MultiScaleRetention(nn.Module):
    """Gated multi-scale retention (RetNet, arXiv 2307.08621 eq. 8; torchscale's layer).

    ``MSR(X) = (swish(X W_G) * HeadRMSNorm(Retention(rot(X W_Q), rot(X W_K), X W_V))) W_O`` with a fixed
    per-head decay ``gamma_h = 1 - 2^(-5-h)``, scale ``K^-0.5`` and rotary position rotation. The retention
    score normalisations of the paper are per-row scalings that the per-head RMSNorm removes, so they are
    left out (up to the norm's epsilon). The decays are :func:`~plstm_graph.ops.sequence.retention`'s defaults,
    built in the computation dtype (not a module buffer: casting the module to bf16 would round the slowest
    decays to 1) and known positive on the host, so the Triton path never synchronises to check them; the
    forward and :meth:`step` read the same cached gates.

    Shapes:
        x: ``[B, T, dim]`` -> ``[B, T, dim]``; state: ``[B, H, K, V]`` (float32), K = dim / heads,
        V = value_dim / heads.

    Example:
        >>> import torch
        >>> layer = MultiScaleRetention(dim=32, num_heads=4)
        >>> x = torch.randn(2, 10, 32)
        >>> y, state = layer(x, output_state=True)
        >>> y.shape, state.shape
        (torch.Size([2, 10, 32]), torch.Size([2, 4, 8, 16]))
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        value_dim: Optional[int] = None,
        mode: str = "chunkwise",
        chunk_size: int = 64,
        norm_eps: float = 1e-5,
        backend: str = "torch",
    ) -> None:
        super().__init__()
        value_dim = 2 * dim if value_dim is None else value_dim
        if dim % num_heads or value_dim % num_heads:
            raise ValueError(f"dim={dim} and value_dim={value_dim} must be multiples of num_heads={num_heads}")
        self.dim, self.num_heads, self.value_dim = dim, num_heads, value_dim
        self.key_head_dim, self.value_head_dim = dim // num_heads, value_dim // num_heads
        if self.key_head_dim % 2:
            raise ValueError(f"dim / num_heads = {self.key_head_dim} must be even (rotary pairs)")
        self.mode, self.chunk_size, self.backend = mode, chunk_size, backend
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, value_dim, bias=False)
        self.g_proj = nn.Linear(dim, value_dim, bias=False)
        self.out_proj = nn.Linear(value_dim, dim, bias=False)
        self.norm = HeadRMSNorm(norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.g_proj):  # torchscale: gain 2^-2.5
            nn.init.xavier_uniform_(lin.weight, gain=2 ** -2.5)
        nn.init.xavier_uniform_(self.out_proj.weight)

    def _project(self, x: torch.Tensor, positions: torch.Tensor):
        B, T, _ = x.shape
        H = self.num_heads
        q = self.q_proj(x).view(B, T, H, self.key_head_dim)
        k = self.k_proj(x).view(B, T, H, self.key_head_dim)
        v = self.v_proj(x).view(B, T, H, self.value_head_dim)
        cos, sin = rotary_angles(self.key_head_dim, positions, dtype=torch.promote_types(q.dtype, torch.float32))
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def _finish(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        o = self.norm(o).flatten(-2)  # [B, T, value_dim]
        return self.out_proj(F.silu(self.g_proj(x)) * o)

    def forward(
        self, x: torch.Tensor, state: Optional[torch.Tensor] = None, offset: int = 0, output_state: bool = False
    ):
        """Returns ``y`` or, with ``output_state``, ``(y, state)``; ``offset`` is the position of ``x[:, 0]``
        (continue after ``state``)."""
        positions = torch.arange(offset, offset + x.shape[1], device=x.device)
        q, k, v = self._project(x, positions)
        o, final = retention(
            q, k, v, initial_state=state, output_final_state=output_state, mode=self.mode,
            chunk_size=self.chunk_size, backend=self.backend,
        )
        y = self._finish(x, o)
        return (y, final) if output_state else y

    def step(self, x: torch.Tensor, state: Optional[torch.Tensor], position: int):
        """One token: ``x [B, dim]`` at ``position`` -> ``(y [B, dim], state [B, H, K, V])``."""
        q, k, v = self._project(x[:, None], torch.tensor([position], device=x.device))
        B, H = x.shape[0], self.num_heads
        gates, _ = _retention_gates(q, None, None)  # the forward's own per-head gates (scale folded in), cached
        o, state = plstm_sequence_step(q[:, 0], k[:, 0], v[:, 0], *(g.expand(B, H) for g in gates), state)
        return self._finish(x[:, None], o[:, None])[:, 0], state


class PLSTM1DLayer(nn.Module):
    """A 1D pLSTM layer: :func:`plstm_graph.plstm_sequence` with gates computed from the input.

    ``source, mark, direct = sigmoid(W x + b)``, ``transition = tanh(transition_scale * (W x + b))`` per
    head (PAPERS.md 1.8: biases -4, 1, -4, -6 for source, transition, mark, direct; scale 5), queries
    scaled by ``K^-0.5``, a per-head RMSNorm on the outputs and an output projection.

    Shapes:
        x: ``[B, T, dim]`` -> ``[B, T, dim]``; state: ``[B, H, K, V]``, K = qk_dim / heads, V = dim / heads.

    Example:
        >>> import torch
        >>> layer = PLSTM1DLayer(dim=16, num_heads=2)
        >>> layer(torch.randn(3, 7, 16)).shape
        torch.Size([3, 7, 16])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qk_dim: Optional[int] = None,
        mode: str = "chunkwise",
        chunk_size: int = 64,
        transition_scale: float = 5.0,
        norm_eps: float = 1e-5,
        backend: str = "torch",
    ) -> None:
        super().__init__()
        qk_dim = dim if qk_dim is None else qk_dim
        if dim % num_heads or qk_dim % num_heads:
            raise ValueError(f"dim={dim} and qk_dim={qk_dim} must be multiples of num_heads={num_heads}")
        self.dim, self.num_heads = dim, num_heads
        self.key_head_dim, self.value_head_dim = qk_dim // num_heads, dim // num_heads
        self.mode, self.chunk_size, self.backend = mode, chunk_size, backend
        self.transition_scale = transition_scale
        self.q_proj = nn.Linear(dim, qk_dim, bias=False)
        self.k_proj = nn.Linear(dim, qk_dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.gate_proj = nn.Linear(dim, 4 * num_heads)  # source, transition, mark, direct
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.norm = HeadRMSNorm(norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(lin.weight)
        nn.init.normal_(self.gate_proj.weight, std=0.02)  # "small normal" init (PAPERS.md 1.8)
        with torch.no_grad():
            bias = self.gate_proj.bias.view(4, self.num_heads)
            for i, b in enumerate((-4.0, 1.0, -4.0, -6.0)):
                bias[i].fill_(b)

    def gates(self, x: torch.Tensor):
        """``x [..., dim]`` -> source, transition, mark, direct, each ``[..., H]`` in float32."""
        raw = self.gate_proj(x).float().unflatten(-1, (4, self.num_heads))
        source, transition, mark, direct = raw.unbind(-2)
        return (
            torch.sigmoid(source), torch.tanh(self.transition_scale * transition), torch.sigmoid(mark),
            torch.sigmoid(direct),
        )

    def _qkv(self, x: torch.Tensor):
        shape = x.shape[:-1]
        q = self.q_proj(x).view(*shape, self.num_heads, self.key_head_dim) * self.key_head_dim ** -0.5
        k = self.k_proj(x).view(*shape, self.num_heads, self.key_head_dim)
        v = self.v_proj(x).view(*shape, self.num_heads, self.value_head_dim)
        return q, k, v

    def forward(self, x: torch.Tensor, state: Optional[torch.Tensor] = None, output_state: bool = False):
        q, k, v = self._qkv(x)
        y, final = plstm_sequence(
            q, k, v, *self.gates(x), initial_state=state, output_final_state=output_state, mode=self.mode,
            chunk_size=self.chunk_size, backend=self.backend,
        )
        y = self.out_proj(self.norm(y).flatten(-2))
        return (y, final) if output_state else y

    def step(self, x: torch.Tensor, state: Optional[torch.Tensor]):
        """One token: ``x [B, dim]`` -> ``(y [B, dim], state [B, H, K, V])``."""
        q, k, v = self._qkv(x)
        y, state = plstm_sequence_step(q, k, v, *self.gates(x), state)
        return self.out_proj(self.norm(y).flatten(-2)), state
