"""Pre-norm residual blocks and the P/D stack used by graph models.

``PLSTMGraphBlock``:  x = x + drop(layer(RMSNorm(x)));  x = x + drop(MLP(RMSNorm(x)))   (GELU MLP;
``layer_scale=s`` multiplies the layer's output by a learned per-channel scale initialised to ``s``)

With ``local_mix=True`` the MLP also reads the block's direct neighbours through their bonds (a GINE-style
local term, :class:`LocalBondMix`): ``h = RMSNorm(x)``, ``x = x + drop(MLP(h + sum_{j ~ n} GELU(h_j + W e_jn)))``,
over every edge in both directions. The pLSTM layer carries information along paths (linear in the
states, gated per edge, with bond features in the gates only); the local term gives each node a non-linear
sum over its bonded neighbours with the bond features in the message itself, which the layer's values
(``v = W_v x`` of the source node, the same for every out-edge) do not carry. Used by the molecule model
(measured on FreeSolv and B3DB, README); off by default here.

``PLSTMGraphStack``: a list of blocks with a ``pattern`` of (mode, reverse) pairs. The default, for 4
layers, is ``[("P", False), ("P", True), ("D", False), ("D", True)]``: two P-mode and two D-mode layers,
forward and reversed DAG each, as the paper does for molecules, so information flows both ways.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..graph.schedule import DAGSchedule
from .graph import PLSTMGraphLayer, resolve_schedule

__all__ = ["PLSTMGraphBlock", "PLSTMGraphStack", "LocalBondMix", "default_pattern"]


def default_pattern(num_layers: int) -> List[Tuple[str, bool]]:
    """``num_layers`` (mode, reverse) pairs: the first half P, the second half D, each alternating
    forward / reversed. ``default_pattern(4) == [("P", False), ("P", True), ("D", False), ("D", True)]``."""
    n_p = (num_layers + 1) // 2
    return [("P" if i < n_p else "D", bool((i if i < n_p else i - n_p) % 2)) for i in range(num_layers)]


class LocalBondMix(nn.Module):
    """Sum over bonded neighbours, both directions of every DAG edge: ``m_n = sum_{j ~ n} GELU(h_j + W e_jn)``.

    A GINE-style message (Hu et al. 2020's GIN with edge features) without its MLP; the block's MLP reads
    ``h + m``. ``edge_dim=None``: messages ``GELU(h_j)`` (no edge features).

    Shapes: h ``[N, dim]``, edge_index ``[2, E]``, edge_attr ``[E, edge_dim]`` or ``None`` -> ``[N, dim]``.

    Example:
        >>> import torch
        >>> mix = LocalBondMix(4, edge_dim=2)
        >>> mix(torch.randn(3, 4), torch.tensor([[0, 1], [1, 2]]), torch.randn(2, 2)).shape
        torch.Size([3, 4])
    """

    def __init__(self, dim: int, edge_dim: Optional[int] = None):
        super().__init__()
        self.edge = nn.Linear(edge_dim, dim) if edge_dim else None

    def reset_parameters(self) -> None:
        if self.edge is not None:
            self.edge.reset_parameters()

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, edge_attr: Optional[torch.Tensor] = None,
                both_directions: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        """``both_directions``: ``(src, dst)`` of :meth:`DAGSchedule.both_directions
        <plstm_graph.graph.DAGSchedule.both_directions>` for ``edge_index`` if the caller has it (cached per
        batch: no index concatenation in the step)."""
        if both_directions is None:
            both_directions = (torch.cat([edge_index[0], edge_index[1]]), torch.cat([edge_index[1], edge_index[0]]))
        src, dst = both_directions
        msg = h[src]
        if self.edge is not None:
            if edge_attr is None:
                raise ValueError("LocalBondMix was built with edge_dim; pass edge_attr")
            e = self.edge(edge_attr.to(h.dtype) if edge_attr.dim() > 1 else edge_attr[:, None].to(h.dtype))
            msg = msg + torch.cat([e, e])
        msg = nn.functional.gelu(msg)
        return torch.zeros_like(h).index_add(0, dst, msg.to(h.dtype))


class PLSTMGraphBlock(nn.Module):
    """Pre-norm residual block: a :class:`PLSTMGraphLayer` then a GELU MLP, each with a residual.

    ``local_mix=True``: the MLP's input also holds :class:`LocalBondMix` of the normalised features (the
    bonded neighbours and, with ``edge_dim``, the bond features); see the module docstring.
    ``layer_scale=s``: the pLSTM layer's output is multiplied by a learned ``[dim]`` vector initialised to
    ``s`` (LayerScale) before the residual; ``None`` (default): no scale.

    Shapes: x ``[N, dim]`` -> ``[N, dim]``.

    Example:
        >>> import torch, plstm_graph
        >>> s = plstm_graph.compile_dag(torch.tensor([[0, 1], [1, 2]]), num_nodes=3, mode="D")
        >>> PLSTMGraphBlock(8, 2, mode="D")(torch.randn(3, 8), s).shape
        torch.Size([3, 8])
    """

    def __init__(
        self, dim: int, num_heads: int, mode: str = "P", reverse: bool = False, edge_dim: Optional[int] = None,
        mlp_ratio: float = 2.0, dropout: float = 0.0, backend: str = "auto", local_mix: bool = False,
        layer_scale: Optional[float] = None, **layer_kwargs,
    ):
        super().__init__()
        self.local = LocalBondMix(dim, edge_dim) if local_mix else None
        self.layer_scale_init = layer_scale
        self.layer_scale = nn.Parameter(torch.full((dim,), float(layer_scale))) if layer_scale is not None else None
        self.norm1 = nn.RMSNorm(dim, eps=1e-5)
        self.layer = PLSTMGraphLayer(dim, num_heads, mode=mode, reverse=reverse, edge_dim=edge_dim,
                                     backend=backend, **layer_kwargs)
        self.norm2 = nn.RMSNorm(dim, eps=1e-5)
        hidden = max(1, int(round(dim * mlp_ratio)))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def reset_parameters(self) -> None:
        self.norm1.reset_parameters()
        self.norm2.reset_parameters()
        self.layer.reset_parameters()
        if self.local is not None:
            self.local.reset_parameters()
        if self.layer_scale is not None:
            with torch.no_grad():
                self.layer_scale.fill_(float(self.layer_scale_init))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    def forward(self, x: torch.Tensor, schedule, edge_attr: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self.layer(self.norm1(x), schedule, edge_attr)
        if self.layer_scale is not None:
            y = y * self.layer_scale
        x = x + self.drop(y)
        return x + self.drop(self.mlp(self.mlp_input(x, schedule, edge_attr)))

    def mlp_input(self, x: torch.Tensor, schedule, edge_attr: Optional[torch.Tensor] = None) -> torch.Tensor:
        """What the MLP reads: ``RMSNorm(x)``, plus :class:`LocalBondMix` of it over the layer's DAG edges with
        ``local_mix`` (``[N, dim]``)."""
        h = self.norm2(x)
        if self.local is not None:
            sched = resolve_schedule(schedule, self.layer.mode, self.layer.reverse)
            ea = edge_attr
            if ea is not None and sched.input_edge_ids is not None:
                ea = ea[sched.input_edge_ids]
            h = h + self.local(h, sched.edge_index, ea, both_directions=sched.both_directions())
        return h


Schedules = Union[DAGSchedule, Sequence[DAGSchedule], Dict[Tuple[str, bool], DAGSchedule], "Data"]


class PLSTMGraphStack(nn.Module):
    """A stack of :class:`PLSTMGraphBlock` following a (mode, reverse) ``pattern``, plus a final RMSNorm.

    Args:
        pattern: list of ``(mode, reverse)``; default :func:`default_pattern` (``num_layers`` is then its
            length; giving both with different lengths is an error).
        local_mix: every block's MLP also reads its bonded neighbours (:class:`LocalBondMix`).
        layer_scale: initial LayerScale of every pLSTM layer's output (``None``: none).
        layer_kwargs: extra keyword arguments of every :class:`PLSTMGraphLayer` (e.g. gate inits).

    ``forward(x, schedules, edge_attr=None)`` takes a PyG ``DAGData`` / batch carrying the needed
    schedules (``attach_schedules(data, modes=("P", "D"), reverse=True)``), a dict
    ``{(mode, reverse): DAGSchedule}``, or a list of one :class:`DAGSchedule` per layer.

    Shapes: x ``[N, dim]``, edge_attr ``[E, edge_dim]`` -> ``[N, dim]``.

    Example:
        >>> import torch
        >>> from torch_geometric.data import Data
        >>> from plstm_graph.graph import attach_schedules
        >>> g = attach_schedules(Data(edge_index=torch.tensor([[0, 0, 1], [1, 2, 2]]), num_nodes=3))
        >>> PLSTMGraphStack(dim=16, num_heads=2)(torch.randn(3, 16), g).shape
        torch.Size([3, 16])
    """

    def __init__(
        self, dim: int, num_heads: int, num_layers: int = 4, pattern: Optional[Sequence[Tuple[str, bool]]] = None,
        edge_dim: Optional[int] = None, mlp_ratio: float = 2.0, dropout: float = 0.0, backend: str = "auto",
        local_mix: bool = False, layer_scale: Optional[float] = None, **layer_kwargs,
    ):
        super().__init__()
        if pattern is None:
            pattern = default_pattern(num_layers)
        elif num_layers != 4 and num_layers != len(pattern):
            raise ValueError(f"num_layers={num_layers} but the pattern has {len(pattern)} entries")
        pattern = [(str(m), bool(r)) for m, r in pattern]
        for m, _ in pattern:
            if m not in ("P", "D"):
                raise ValueError(f"pattern modes must be 'P' or 'D', got {m!r}")
        self.pattern = pattern
        self.blocks = nn.ModuleList(
            PLSTMGraphBlock(dim, num_heads, mode=m, reverse=r, edge_dim=edge_dim, mlp_ratio=mlp_ratio,
                            dropout=dropout, backend=backend, local_mix=local_mix, layer_scale=layer_scale,
                            **layer_kwargs)
            for m, r in pattern
        )
        self.norm = nn.RMSNorm(dim, eps=1e-5)

    def reset_parameters(self) -> None:
        for b in self.blocks:
            b.reset_parameters()
        self.norm.reset_parameters()

    def _schedule_for(self, i: int, schedules):
        mode, rev = self.pattern[i]
        if isinstance(schedules, DAGSchedule):
            if len(self.pattern) > 1:
                raise ValueError("a single DAGSchedule fits a one-layer stack only; pass a PyG batch, a dict "
                                 "{(mode, reverse): schedule} or one schedule per layer")
            return schedules
        if isinstance(schedules, dict):
            if (mode, rev) not in schedules:
                raise ValueError(f"no schedule for (mode={mode!r}, reverse={rev}) in the dict")
            return schedules[(mode, rev)]
        if isinstance(schedules, (list, tuple)):
            if len(schedules) != len(self.pattern):
                raise ValueError(f"got {len(schedules)} schedules for {len(self.pattern)} layers")
            return schedules[i]
        return schedules  # a PyG batch: the layer picks batch.schedule(mode, reverse)

    def forward(self, x: torch.Tensor, schedules: Schedules, edge_attr: Optional[torch.Tensor] = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, self._schedule_for(i, schedules), edge_attr)
        return self.norm(x)
