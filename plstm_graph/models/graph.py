"""A general pLSTM graph model: input encoders -> :class:`PLSTMGraphStack` -> readout -> head.

Graph-level (``task="graph"``): ``[B, out_dim]`` from a readout over each graph's nodes.
Node-level (``task="node"``): ``[N, out_dim]``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..nn.blocks import PLSTMGraphStack
from ..nn.readout import make_readout

__all__ = ["PLSTMGraphModel"]


class PLSTMGraphModel(nn.Module):
    """Encoder, pLSTM stack, (readout), MLP head.

    Args:
        in_dim: node input features; dim: hidden width; out_dim: outputs per graph / node.
        num_heads, num_layers, pattern, mlp_ratio, dropout, backend: see :class:`PLSTMGraphStack`.
        edge_in_dim: edge input features (``None``: no edge features).
        task: ``"graph"`` or ``"node"``.
        readout: ``"mean"``, ``"sum"`` or ``"attention"`` (graph task only).
        layer_kwargs: passed to every :class:`~plstm_graph.nn.PLSTMGraphLayer`.

    ``forward(batch)`` takes a PyG ``DAGData`` / batch with ``x`` (and ``edge_attr``), carrying the
    schedules the pattern needs; ``forward(batch, x=..., edge_attr=...)`` overrides the features.

    Shapes: ``batch.x [N, in_dim]``, ``batch.edge_attr [E, edge_in_dim]`` -> ``[B, out_dim]`` (graph)
    or ``[N, out_dim]`` (node).

    Example:
        >>> import torch
        >>> from torch_geometric.data import Data
        >>> from torch_geometric.loader import DataLoader
        >>> from plstm_graph.graph import attach_schedules
        >>> g = attach_schedules(Data(x=torch.randn(3, 5), edge_index=torch.tensor([[0, 1], [1, 2]]),
        ...                           edge_attr=torch.randn(2, 2)))
        >>> batch = next(iter(DataLoader([g, g, g], batch_size=3)))
        >>> model = PLSTMGraphModel(in_dim=5, dim=16, out_dim=1, num_heads=2, num_layers=4, edge_in_dim=2)
        >>> model(batch).shape
        torch.Size([3, 1])
    """

    def __init__(
        self, in_dim: int, dim: int, out_dim: int, num_heads: int = 4, num_layers: int = 4,
        edge_in_dim: Optional[int] = None, task: str = "graph", readout: str = "mean",
        pattern: Optional[Sequence[Tuple[str, bool]]] = None, mlp_ratio: float = 2.0, dropout: float = 0.0,
        backend: str = "auto", **layer_kwargs,
    ):
        super().__init__()
        if task not in ("graph", "node"):
            raise ValueError(f"task must be 'graph' or 'node', got {task!r}")
        self.task = task
        self.node_encoder = nn.Linear(in_dim, dim)
        self.edge_encoder = nn.Linear(edge_in_dim, dim) if edge_in_dim else None
        self.stack = PLSTMGraphStack(
            dim, num_heads, num_layers=num_layers if pattern is None else len(pattern), pattern=pattern,
            edge_dim=dim if edge_in_dim else None, mlp_ratio=mlp_ratio, dropout=dropout, backend=backend,
            **layer_kwargs,
        )
        self.readout = make_readout(readout, dim, num_heads) if task == "graph" else None
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, out_dim))

    def reset_parameters(self) -> None:
        self.node_encoder.reset_parameters()
        if self.edge_encoder is not None:
            self.edge_encoder.reset_parameters()
        self.stack.reset_parameters()
        if self.readout is not None and hasattr(self.readout, "reset_parameters"):
            self.readout.reset_parameters()
        for m in self.head:
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    def forward(self, batch, x: Optional[torch.Tensor] = None, edge_attr: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = batch.x if x is None else x
        if x is None:
            raise ValueError("the batch has no node features x; pass x=...")
        h = self.node_encoder(x.float() if not torch.is_floating_point(x) else x)
        e = None
        if self.edge_encoder is not None:
            ea = getattr(batch, "edge_attr", None) if edge_attr is None else edge_attr
            if ea is None:
                raise ValueError("the model was built with edge_in_dim but the batch has no edge_attr")
            if ea.dim() == 1:
                ea = ea[:, None]
            e = self.edge_encoder(ea if torch.is_floating_point(ea) else ea.float())
        h = self.stack(h, batch, e)
        if self.task == "graph":
            bvec = getattr(batch, "batch", None)
            if bvec is None:
                bvec = torch.zeros(h.size(0), dtype=torch.long, device=h.device)
            h = self.readout(h, bvec, int(getattr(batch, "num_graphs", 1)))
        return self.head(h)
