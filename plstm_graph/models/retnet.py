"""RetNetLM: a small decoder-only RetNet language model (arXiv 2307.08621; torchscale's block layout).

Block: ``x = x + MSR(RMSNorm(x)); x = x + SwiGLU(RMSNorm(x))``; embeddings tied to the output head.
``forward`` runs retention chunkwise (or in parallel); ``step`` decodes one token with an O(1) state per
layer (``[B, H, K, V]`` each, independent of how many tokens were seen); ``generate`` combines the two.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.norm import RMSNorm
from ..nn.sequence import MultiScaleRetention

__all__ = ["RetNetLM", "RetNetState"]


class _SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, value_dim: int, ffn_dim: int, mode: str, chunk_size: int, backend: str):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.retention = MultiScaleRetention(
            dim=dim, num_heads=num_heads, value_dim=value_dim, mode=mode, chunk_size=chunk_size, backend=backend
        )
        self.norm2 = RMSNorm(dim)
        self.ffn = _SwiGLU(dim, ffn_dim)


@dataclass
class RetNetState:
    """Decoding state: one ``[B, H, K, V]`` float32 retention state per layer and the next position."""

    layers: List[Optional[torch.Tensor]]
    position: int = 0

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.layers if s is not None)


class RetNetLM(nn.Module):
    """Decoder-only RetNet language model.

    Shapes:
        input_ids: ``[B, T]`` (long) -> logits ``[B, T, vocab_size]``; ``step``: token_ids ``[B]`` ->
        logits ``[B, vocab_size]``.

    Example:
        >>> import torch
        >>> model = RetNetLM(vocab_size=50, dim=32, num_layers=2, num_heads=2)
        >>> ids = torch.randint(0, 50, (2, 9))
        >>> logits = model(ids)
        >>> state = None
        >>> for t in range(9):
        ...     step_logits, state = model.step(ids[:, t], state)
        >>> bool(torch.allclose(step_logits, logits[:, -1], atol=1e-4))
        True
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        num_layers: int,
        num_heads: int,
        value_dim: Optional[int] = None,
        ffn_dim: Optional[int] = None,
        mode: str = "chunkwise",
        chunk_size: int = 64,
        backend: str = "torch",
        tie_embeddings: bool = True,
    ) -> None:
        super().__init__()
        value_dim = 2 * dim if value_dim is None else value_dim
        ffn_dim = 2 * dim if ffn_dim is None else ffn_dim
        self.vocab_size, self.dim, self.num_layers = vocab_size, dim, num_layers
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(
            _Block(dim, num_heads, value_dim, ffn_dim, mode, chunk_size, backend) for _ in range(num_layers)
        )
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=dim ** -0.5)
        if tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor, state: Optional[RetNetState] = None, output_state: bool = False):
        """Logits ``[B, T, vocab]``; with ``output_state`` also the :class:`RetNetState` after the last token
        (``state`` continues a previous call)."""
        x = self.embed(input_ids)
        offset = 0 if state is None else state.position
        new_states = []
        for i, block in enumerate(self.blocks):
            init = None if state is None else state.layers[i]
            h, s = block.retention(block.norm1(x), state=init, offset=offset, output_state=True)
            x = x + h
            x = x + block.ffn(block.norm2(x))
            new_states.append(s)
        logits = self.head(self.norm(x))
        if output_state:
            return logits, RetNetState(new_states, offset + input_ids.shape[1])
        return logits

    def step(self, token_ids: torch.Tensor, state: Optional[RetNetState] = None):
        """One token per sequence: ``token_ids [B]`` -> ``(logits [B, vocab], state)``; O(1) work and memory."""
        if state is None:
            state = RetNetState([None] * self.num_layers, 0)
        x = self.embed(token_ids)
        new_states = []
        for block, s in zip(self.blocks, state.layers):
            h, s = block.retention.step(block.norm1(x), s, state.position)
            x = x + h
            x = x + block.ffn(block.norm2(x))
            new_states.append(s)
        return self.head(self.norm(x)), RetNetState(new_states, state.position + 1)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` after ``prompt_ids [B, T0]`` (T0 >= 1): the prompt runs chunkwise, then
        one :meth:`step` per token. ``temperature=0`` is greedy. Returns ``[B, T0 + max_new_tokens]``."""
        if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
            raise ValueError(f"prompt_ids must be [B, T0] with T0 >= 1, got {list(prompt_ids.shape)}")
        logits, state = self(prompt_ids[:, :-1], output_state=True) if prompt_ids.shape[1] > 1 else (None, None)
        logits, state = self.step(prompt_ids[:, -1], state)
        out = [prompt_ids]
        for _ in range(max_new_tokens):
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                scaled = logits.float() / temperature
                if top_k is not None:
                    kth = scaled.topk(min(top_k, scaled.shape[-1]), -1).values[..., -1:]
                    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                nxt = torch.multinomial(scaled.softmax(-1), 1, generator=generator)[:, 0]
            out.append(nxt[:, None])
            logits, state = self.step(nxt, state)
        return torch.cat(out, 1)
