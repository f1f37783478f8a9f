"""Pre-norm residual blocks and the P/D stack used by graph models.

``PLSTMGraphBlock``:  x = x + drop(layer(RMSNorm(x)));  x = x + drop(MLP(RMSNorm(x)))   (GELU MLP;
``layer_scale=s`` multiplies the layer's output by a learned per-channel scale initialised to ``s``)

With ``local_mix=True`` the MLP also reads the block's direct neighbours through their bonds (a GINE-style
local term, :class:`LocalBondMix`): ``h = RMSNorm(x)``, ``x = x + drop(MLP(h + sum_{j ~ n} GELU(h_j + W e_jn)))``,
over every edge in both directions. The pLSTM layer carries information along paths (linear in the
states, gated per edge, with bond features in the gates only); the local term gives each node a non-linear
sum over its bonded neighbours with the bond features in the message itself, which the layer's values
(``v = W_v x`` of the source node, the same for every out-edge) do not carry; off by default here.

With ``local_mix="gine"`` the second residual is GIN's layer instead (Xu et al. 2019 with bond features, Hu
et al. 2020's GINE, as PyG's ``GINEConv``): ``x = x + drop(ReLU(MLP((1 + eps) x_n + sum_{j ~ n} ReLU(x_j +
W e_jn))))`` with ``MLP = Linear, BatchNorm1d, ReLU, Linear`` and a learned ``eps`` (from 0), reading the
residual stream without a norm, as GIN's layers read theirs. Used by the molecule model (README, Results).

With ``local_mix="gin"`` the block is GIN's layer itself, without a residual around it, and the pLSTM branch adds
to its input: ``x = x + drop(s * layer(RMSNorm(x)))``, ``x = drop(ReLU(GINE(x)))`` (the last block of a stack
returns ``GINE(x)``, no activation or dropout, and the stack has no final norm), so with the LayerScale ``s`` at
zero a stack is exactly PyG's ``GIN`` with ``GINEConv`` layers (as the ``gin`` baseline: ``BasicGNN``), and the
pLSTM paths enter every layer's input from there.

``PLSTMGraphStack``: a list of blocks with a ``pattern`` of (mode, reverse) pairs. The default, for 4
layers, is ``[("P", False), ("P", True), ("D", False), ("D", True)]``: two P-mode and two D-mode layers,
forward and reversed DAG each, as the paper does for molecules, so information flows both ways.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..graph.schedule import DAGSchedule
from .graph import PLSTMGraphLayer, resolve_schedule, use_fused_kernel

__all__ = ["PLSTMGraphBlock", "PLSTMGraphStack", "LocalBondMix", "default_pattern", "local_kind", "LOCAL_KINDS"]


LOCAL_KINDS = ("mix", "gine", "gin")


def local_kind(local_mix: Union[bool, str, None]) -> Optional[str]:
    """The block's local part from its ``local_mix`` argument: ``True`` / ``"mix"`` -> ``"mix"`` (RMSNorm, then
    the MLP reads ``h + LocalBondMix(h)``), ``"gine"`` -> ``"gine"`` (GIN's layer as the second residual),
    ``"gin"`` -> ``"gin"`` (GIN's layer without a residual, the pLSTM branch adding to its input),
    ``False`` / ``None`` / ``"off"`` -> ``None`` (a per-node MLP)."""
    if local_mix is True or local_mix == "mix":
        return "mix"
    if local_mix is False or local_mix is None or local_mix == "off":
        return None
    if local_mix in ("gine", "gin"):
        return local_mix
    raise ValueError(f"local_mix must be True, False, 'mix', 'gine', 'gin' or 'off', got {local_mix!r}")


def default_pattern(num_layers: int) -> List[Tuple[str, bool]]:
    """``num_layers`` (mode, reverse) pairs: the first half P, the second half D, each alternating
    forward / reversed. ``default_pattern(4) == [("P", False), ("P", True), ("D", False), ("D", True)]``."""
    n_p = (num_layers + 1) // 2
    return [("P" if i < n_p else "D", bool((i if i < n_p else i - n_p) % 2)) for i in range(num_layers)]


class LocalBondMix(nn.Module):
    """Sum over bonded neighbours, both directions of every DAG edge: ``m_n = sum_{j ~ n} GELU(h_j + W e_jn)``.

    A GINE-style message (Hu et al. 2020's GIN with edge features) without its MLP; the block's MLP reads
    ``h + m``. ``edge_dim=None``: messages ``GELU(h_j)`` (no edge features). ``activation="relu"``: ReLU
    messages (GIN's; the ``local_mix="gine"`` blocks). ``fused``: :meth:`residual_add` runs the Triton kernel
    of :mod:`plstm_graph.kernels.local_mix` (``None``: on CUDA; see :meth:`use_kernel`).

    Shapes: h ``[N, dim]``, edge_index ``[2, E]``, edge_attr ``[E, edge_dim]`` or ``None`` -> ``[N, dim]``.

    Example:
        >>> import torch
        >>> mix = LocalBondMix(4, edge_dim=2)
        >>> mix(torch.randn(3, 4), torch.tensor([[0, 1], [1, 2]]), torch.randn(2, 2)).shape
        torch.Size([3, 4])
    """

    def __init__(self, dim: int, edge_dim: Optional[int] = None, fused: Optional[bool] = None,
                 activation: str = "gelu"):
        super().__init__()
        if activation not in ("gelu", "relu"):
            raise ValueError(f"activation must be 'gelu' or 'relu', got {activation!r}")
        self.activation = activation
        self.edge = nn.Linear(edge_dim, dim) if edge_dim else None
        # residual_add's kernel (plstm_graph.kernels.local_mix): None = on CUDA when triton is installed
        self.fused = fused

    def reset_parameters(self) -> None:
        if self.edge is not None:
            self.edge.reset_parameters()

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, edge_attr: Optional[torch.Tensor] = None,
                both_directions: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                edge_preact: Optional[torch.Tensor] = None):
        """``both_directions``: ``(src, dst)`` of :meth:`DAGSchedule.both_directions
        <plstm_graph.graph.DAGSchedule.both_directions>` for ``edge_index`` if the caller has it (cached per
        batch: no index concatenation in the step). ``edge_preact``: ``self.edge(edge_attr)`` if the caller
        already has it (:class:`PLSTMGraphStack` makes every block's edge projections in one GEMM)."""
        if both_directions is None:
            both_directions = (torch.cat([edge_index[0], edge_index[1]]), torch.cat([edge_index[1], edge_index[0]]))
        src, dst = both_directions
        msg = h[src]
        if self.edge is not None:
            if edge_attr is None:
                raise ValueError("LocalBondMix was built with edge_dim; pass edge_attr")
            e = edge_preact
            if e is None:
                e = self.edge(edge_attr.to(h.dtype) if edge_attr.dim() > 1 else edge_attr[:, None].to(h.dtype))
            msg = msg + torch.cat([e, e])
        msg = nn.functional.gelu(msg) if self.activation == "gelu" else nn.functional.relu(msg)
        return torch.zeros_like(h).index_add(0, dst, msg.to(h.dtype))

    def use_kernel(self, h: torch.Tensor) -> bool:
        """Whether :meth:`residual_add` runs the fused Triton kernel: ``fused=True``, or ``None`` (default) on
        CUDA with triton installed; never under ``torch.compile`` or for float64."""
        return use_fused_kernel(self.fused, h, "LocalBondMix(fused=True)")

    def residual_add(self, h: torch.Tensor, edge_index: torch.Tensor, edge_attr: Optional[torch.Tensor] = None,
                     input_edge_ids: Optional[torch.Tensor] = None, edge_preact: Optional[torch.Tensor] = None,
                     both_directions: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                     base: Optional[torch.Tensor] = None, eps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``base + self(h, ...)`` (``base`` defaults to ``h``; with ``eps``, a one-element tensor, it is GIN's
        ``(1 + eps) * h``), with the edge rows of ``edge_attr`` / ``edge_preact`` (``[E_in, .]``) picked by
        ``input_edge_ids`` (``None``: row ``j`` for edge ``j``). On CUDA one fused Triton kernel each way
        (:mod:`plstm_graph.kernels.local_mix`, see :meth:`use_kernel`); else the readable form above."""
        if self.edge is not None and edge_attr is None and edge_preact is None:
            raise ValueError("LocalBondMix was built with edge_dim; pass edge_attr")
        if self.use_kernel(h):
            from ..kernels.local_mix import local_mix_triton

            pre = None
            if self.edge is not None:
                pre = edge_preact
                if pre is None:
                    ea = edge_attr if edge_attr.dim() > 1 else edge_attr[:, None]
                    pre = self.edge(ea.to(h.dtype))
            return local_mix_triton(h, edge_index, pre, input_edge_ids, base=base, activation=self.activation,
                                    eps=eps)
        if eps is not None:
            base = h * (1 + eps)
        if input_edge_ids is not None:
            edge_attr = edge_attr[input_edge_ids] if edge_attr is not None else None
            edge_preact = edge_preact[input_edge_ids] if edge_preact is not None else None
        return (h if base is None else base) + self(h, edge_index, edge_attr, both_directions=both_directions,
                                                    edge_preact=edge_preact)


class PLSTMGraphBlock(nn.Module):
    """Pre-norm residual block: a :class:`PLSTMGraphLayer` then a GELU MLP, each with a residual.

    ``local_mix=True`` (or ``"mix"``): the MLP's input also holds :class:`LocalBondMix` of the normalised
    features (the bonded neighbours and, with ``edge_dim``, the bond features); ``local_mix="gine"``: GIN's
    layer replaces the MLP half; ``local_mix="gin"``: GIN's layer without a residual (see the module docstring;
    ``last=True``: no activation or dropout after it, as GIN's last layer, set by :class:`PLSTMGraphStack`).
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
        mlp_ratio: float = 2.0, dropout: float = 0.0, backend: str = "auto", local_mix: Union[bool, str] = False,
        layer_scale: Optional[float] = None, last: bool = False, **layer_kwargs,
    ):
        super().__init__()
        self.local_kind = local_kind(local_mix)
        self.last = bool(last)
        gin_like = self.local_kind in ("gine", "gin")
        if gin_like:
            self.local = LocalBondMix(dim, edge_dim, activation="relu")
            self.gine_eps = nn.Parameter(torch.zeros(1))
        else:
            self.local = LocalBondMix(dim, edge_dim) if self.local_kind == "mix" else None
        self.layer_scale_init = layer_scale
        self.layer_scale = nn.Parameter(torch.full((dim,), float(layer_scale))) if layer_scale is not None else None
        self.norm1 = nn.RMSNorm(dim, eps=1e-5)
        self.layer = PLSTMGraphLayer(dim, num_heads, mode=mode, reverse=reverse, edge_dim=edge_dim,
                                     backend=backend, **layer_kwargs)
        if gin_like:  # GIN's layer: MLP Linear, BatchNorm, ReLU, Linear (no pre-norm)
            self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(), nn.Linear(dim, dim))
        else:
            self.norm2 = nn.RMSNorm(dim, eps=1e-5)
            hidden = max(1, int(round(dim * mlp_ratio)))
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def reset_parameters(self) -> None:
        self.norm1.reset_parameters()
        if self.local_kind in ("gine", "gin"):
            with torch.no_grad():
                self.gine_eps.zero_()
        else:
            self.norm2.reset_parameters()
        self.layer.reset_parameters()
        if self.local is not None:
            self.local.reset_parameters()
        if self.layer_scale is not None:
            with torch.no_grad():
                self.layer_scale.fill_(float(self.layer_scale_init))
        for m in self.mlp:
            if isinstance(m, (nn.Linear, nn.BatchNorm1d)):
                m.reset_parameters()

    def forward(self, x: torch.Tensor, schedule, edge_attr: Optional[torch.Tensor] = None,
                edge_proj: Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = None) -> torch.Tensor:
        """``edge_proj``: ``(layer.gate_edge(edge_attr), local.edge(edge_attr))`` if the caller already has them
        (:meth:`PLSTMGraphStack.edge_projections`; ``None`` entries are computed here)."""
        gate_pre, local_pre = edge_proj if edge_proj is not None else (None, None)
        y = self.layer(self.norm1(x), schedule, edge_attr, edge_preact=gate_pre)
        if self.layer_scale is not None:
            y = y * self.layer_scale
        x = x + self.drop(y)
        if self.local_kind == "gin":  # GIN's layer, no residual; the last one without activation and dropout
            h = self.mlp(self.mlp_input(x, schedule, edge_attr, local_pre))
            return h if self.last else self.drop(nn.functional.relu(h))
        if self.local_kind == "gine":
            return x + self.drop(nn.functional.relu(self.mlp(self.mlp_input(x, schedule, edge_attr, local_pre))))
        return x + self.drop(self.mlp(self.mlp_input(x, schedule, edge_attr, local_pre)))

    def mlp_input(self, x: torch.Tensor, schedule, edge_attr: Optional[torch.Tensor] = None,
                  edge_preact: Optional[torch.Tensor] = None) -> torch.Tensor:
        """What the MLP reads (``[N, dim]``; ``edge_preact``: ``local.edge(edge_attr)`` if already made):
        ``RMSNorm(x)``, plus :class:`LocalBondMix` of it over the layer's DAG edges with ``local_mix``; with
        ``local_mix="gine"`` / ``"gin"`` GIN's aggregation of ``x`` itself, ``(1 + eps) x_n + sum_{j ~ n} ReLU(x_j
        + W e_jn)``."""
        gin_like = self.local_kind in ("gine", "gin")
        h = x if gin_like else self.norm2(x)
        if self.local is not None:
            sched = resolve_schedule(schedule, self.layer.mode, self.layer.reverse)
            ids = sched.input_edge_ids if edge_attr is not None else None
            h = self.local.residual_add(h, sched.edge_index, edge_attr, ids, edge_preact,
                                        both_directions=sched.both_directions(),
                                        eps=self.gine_eps if gin_like else None)
        return h


Schedules = Union[DAGSchedule, Sequence[DAGSchedule], Dict[Tuple[str, bool], DAGSchedule], "Data"]


class PLSTMGraphStack(nn.Module):
    """A stack of :class:`PLSTMGraphBlock` following a (mode, reverse) ``pattern``, plus a final RMSNorm (none with
    ``local_mix="gin"``, whose last block ends as GIN's last layer does).

    Args:
        pattern: list of ``(mode, reverse)``; default :func:`default_pattern` (``num_layers`` is then its
            length; giving both with different lengths is an error).
        local_mix: every block's local part (:func:`local_kind`): ``True`` / ``"mix"``: the MLP also reads the
            bonded neighbours (:class:`LocalBondMix`); ``"gine"``: GIN's layer as the second residual;
            ``"gin"``: GIN's layer without a residual, the pLSTM branch adding to its input.
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
        local_mix: Union[bool, str] = False, layer_scale: Optional[float] = None, **layer_kwargs,
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
                            last=i == len(pattern) - 1, **layer_kwargs)
            for i, (m, r) in enumerate(pattern)
        )
        self.norm = nn.Identity() if local_kind(local_mix) == "gin" else nn.RMSNorm(dim, eps=1e-5)

    def reset_parameters(self) -> None:
        for b in self.blocks:
            b.reset_parameters()
        if isinstance(self.norm, nn.RMSNorm):
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

    def edge_projections(self, edge_attr: torch.Tensor) -> List[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]:
        """Per block ``(layer.gate_edge(edge_attr), local.edge(edge_attr))`` (``None`` where a block has no
        such map), all from ONE matrix product: the maps read only the edge features, not the block's input,
        so every block's can be made up front; under autocast one cast and one GEMM instead of two of each
        per block, and one per gradient in backward. Weights are stacked in the step (parameters and
        checkpoints unchanged); the values are those of the maps one by one (tested).

        Shapes: edge_attr ``[E, edge_dim]`` -> per block ``[E, 4H]`` (float32 or wider) and ``[E, dim]``.
        """
        if edge_attr.dim() == 1:
            edge_attr = edge_attr[:, None]
        maps = [(i, 0, b.layer.gate_edge) for i, b in enumerate(self.blocks) if b.layer.gate_edge is not None]
        maps += [(i, 1, b.local.edge) for i, b in enumerate(self.blocks) if b.local is not None and b.local.edge is not None]
        out: List[List[Optional[torch.Tensor]]] = [[None, None] for _ in self.blocks]
        if not maps:
            return [tuple(p) for p in out]
        # gate maps first (no bias): their bias is the zero pad, then the local maps' biases
        n_gate = sum(m.out_features for _, kind, m in maps if kind == 0)
        weight = torch.cat([m.weight for _, _, m in maps])
        bias = None
        if any(kind == 1 and m.bias is not None for _, kind, m in maps):
            bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features)
                              for _, k, m in maps if k == 1])
            bias = torch.cat([self._gate_bias_pad(n_gate, bias), bias]) if n_gate else bias
        proj = nn.functional.linear(edge_attr, weight, bias)  # [E, sum of widths]
        gates = proj[:, :n_gate]
        if gates.dtype in (torch.float16, torch.bfloat16):
            gates = gates.float()  # one cast for every layer's gates (the layer keeps them in float32)
        parts = iter(list(gates.split([m.out_features for _, k, m in maps if k == 0], dim=-1))
                     + list(proj[:, n_gate:].split([m.out_features for _, k, m in maps if k == 1], dim=-1)))
        for (i, kind, _), part in zip(maps, parts):
            out[i][kind] = part
        return [tuple(p) for p in out]

    def _gate_bias_pad(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """``[n]`` zeros on ``like``'s device and dtype, kept between steps (no fill launch per step)."""
        pad = self.__dict__.get("_bias_pad")
        if pad is None or pad.numel() != n or pad.device != like.device or pad.dtype != like.dtype:
            pad = self.__dict__["_bias_pad"] = torch.zeros(n, dtype=like.dtype, device=like.device)
        return pad

    # every block's edge-feature maps in one GEMM (edge_projections): True / False, or None: on CUDA only. It
    # exists to cut kernel launches; on CPU the stacked GEMM (MKL) rounded a row differently depending on its
    # position in the batch, which broke "the same molecule twice in a batch, the same prediction" bit for bit
    fuse_edge_projections: Optional[bool] = None

    def forward(self, x: torch.Tensor, schedules: Schedules, edge_attr: Optional[torch.Tensor] = None) -> torch.Tensor:
        # fused only when the edge features have the blocks' dtype (else each block maps them itself, as
        # LocalBondMix casts them to its input's dtype)
        fuse = self.fuse_edge_projections if self.fuse_edge_projections is not None else x.is_cuda
        fused = fuse and edge_attr is not None and edge_attr.dtype == x.dtype and len(self.blocks) > 1
        proj = self.edge_projections(edge_attr) if fused else [None] * len(self.blocks)
        for i, block in enumerate(self.blocks):
            x = block(x, self._schedule_for(i, schedules), edge_attr, edge_proj=proj[i])
        return self.norm(x)
