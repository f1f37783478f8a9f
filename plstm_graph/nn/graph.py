"""pLSTM layers on DAGs: node (and edge) features -> gates -> :func:`plstm_graph.plstm_dag` -> node features.

One layer computes, per head ``h`` (SPEC sections 2 and 3)::

    q_n = W_q x_n * K^-0.5,   k_n = W_k x_n,   v_n = W_v x_n                       [N, H, K] / [N, H, V]
    source[b]       = sigmoid(s_b)         for b = (u -> w);  s_b from (x_u, x_w, e_b)
    transition[a,b] = tanh(tau * t_ab)     for a = (x -> u), b = (u -> w);  t_ab from (x_x, x_u, x_w, e_a, e_b)
    mark[a]         = sigmoid(m_a)         for a = (x -> n);  m_a from (x_n, x_x, e_a)
    direct[n]       = sigmoid(d_n)         d_n from x_n
    y = out_proj(RMSNorm_per_head(plstm_dag(q, k, v, source, transition, mark, direct)))

Every pre-activation is a sum of per-node linear maps gathered along the edge / line edge plus linear
maps of the edge features, so a gate sees only its local neighbourhood and there is no maximum degree
(the reference implementation of the paper reserves one parameter slot per neighbour instead).

Modes (SPEC section 3):

* ``"P"`` (propagation, full line graph): sources and transitions are normalised per node,
  ``source[b] /= max(1, sum_{b' leaving u} |source[b']|)`` and
  ``transition[a, b] /= max(1, sum_{b'} |transition[a, b']|)``; the bound holds for any input and a
  signal is never amplified. With saturated transitions a node at criticality splits its incoming state
  evenly over its outgoing edges (activation is conserved).
* ``"D"`` (diffusion) runs on the multitree schedule, where ``|transition| <= 1`` and ``|source| <= 1``
  already bound every state; no normalisation is needed.

``normalize=False`` turns the P-mode normalisation off (for the stability benchmark only: it explodes).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from ..graph.schedule import DAGSchedule
from ..ops import plstm_dag
from .norm import MultiHeadRMSNorm

__all__ = ["PLSTMGraphLayer", "GraphGates", "MultiHeadRMSNorm", "p_normalize", "resolve_schedule"]


# torch.compile: the operator runs eagerly (a graph break). Its level loop is data-dependent, and the levels
# backend caches index plans on the schedule inside its autograd.Function, which dynamo cannot trace
# (InternalTorchDynamoError on torch 2.13). Projections, gates and norms around it are still compiled.
# The wrapper is built on first use: torch.compiler.disable imports torch._dynamo (seconds), which a
# plain eager user should not pay at import time.
_EAGER_OPERATOR = []


def _operator():
    if torch.compiler.is_compiling() or _EAGER_OPERATOR:
        if not _EAGER_OPERATOR:
            _EAGER_OPERATOR.append(torch.compiler.disable(plstm_dag))
        return _EAGER_OPERATOR[0]
    return plstm_dag


def _kgates():
    from ..kernels import graph_gates  # lazy: triton is imported on first use only

    return graph_gates


_GATE_KERNELS = []


def _gate_kernels_available() -> bool:
    if not _GATE_KERNELS:
        from ..kernels._common import available

        _GATE_KERNELS.append(available())
    return _GATE_KERNELS[0]


def use_fused_kernel(flag: Optional[bool], t: torch.Tensor, what: str) -> bool:
    """Whether a module with a fused-kernel switch ``flag`` runs its Triton kernel on ``t``: ``False`` never;
    ``None`` (auto) on CUDA when triton is installed; ``True`` always (on CPU only under ``TRITON_INTERPRET=1``,
    else a clear error naming ``what``). Never under ``torch.compile`` or for dtypes other than float32,
    bfloat16 and float16 (float64 takes the readable form)."""
    if flag is False or torch.compiler.is_compiling() or t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if flag is None:
        return t.is_cuda and _gate_kernels_available()
    if not _gate_kernels_available():
        raise RuntimeError(f"{what} needs the triton package and a CUDA device (or TRITON_INTERPRET=1 on CPU); "
                           "pip install 'plstm-graph[triton]' or leave it at None")
    return True


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Upcast half precision to float32; keep float32 / float64 as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class GraphGates(NamedTuple):
    """Gates of one layer call. Shapes: source, mark ``[E, H]``; transition ``[L, H]``; direct ``[N, H]``."""

    source: torch.Tensor
    transition: torch.Tensor
    mark: torch.Tensor
    direct: torch.Tensor


def p_normalize(values: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Divide every value by ``max(1, sum of |values| in its group)`` (the P-mode rule, SPEC section 3).

    After this, ``sum_{i in g} |out_i| <= 1`` for every group ``g`` (up to float rounding), and groups
    already inside the bound are unchanged. Used with ``group = tail of each edge`` for sources and
    ``group = incoming edge a of each line edge (a, b)`` for transitions.

    Shapes:
        values: ``[M, H]`` (finite); group: ``[M]`` long in ``[0, num_groups)``; returns ``[M, H]``.

    Example:
        >>> import torch
        >>> out = p_normalize(torch.tensor([[0.8], [0.6], [0.3]]), torch.tensor([0, 0, 1]), 2)
        >>> [round(v, 4) for v in out.flatten().tolist()]       # group 0 sums to 1.4 -> divided by 1.4
        [0.5714, 0.4286, 0.3]
    """
    if values.numel() == 0:
        return values
    total = torch.zeros(num_groups, values.size(1), dtype=values.dtype, device=values.device)
    total = total.index_add(0, group, values.abs())  # [G, H]
    return values / total.clamp(min=1.0)[group]


def resolve_schedule(schedule, mode: str, reverse: bool) -> DAGSchedule:
    """A :class:`DAGSchedule` from either a schedule or a PyG ``DAGData`` / batch (``batch.schedule``)."""
    if isinstance(schedule, DAGSchedule):
        if schedule.mode != mode:
            raise ValueError(
                f"a {mode}-mode layer got a {schedule.mode}-mode schedule; compile it with "
                f"compile_dag(..., mode={mode!r}) or pass the PyG batch (DAGData) instead"
            )
        return schedule
    if hasattr(schedule, "schedule") and callable(schedule.schedule):
        return schedule.schedule(mode, reverse)
    raise TypeError(
        "schedule must be a DAGSchedule (plstm_graph.compile_dag) or a DAGData / PyG batch built with "
        f"plstm_graph.graph.attach_schedules, got {type(schedule).__name__}"
    )


class PLSTMGraphLayer(nn.Module):
    """pLSTM layer on a DAG (P- or D-mode): ``[N, dim] -> [N, dim]``.

    Args:
        dim: node feature width.
        num_heads: ``H``.
        mode: ``"P"`` (full line graph, per-node normalised gates) or ``"D"`` (multitree schedule).
        reverse: run on the reversed DAG (used when ``schedule`` is a PyG batch; an explicit
            :class:`DAGSchedule` is used as given).
        edge_dim: width of ``edge_attr`` (``None``: the layer takes no edge features).
        head_dim: ``K = V`` per head (default ``dim // num_heads``).
        backend: ``plstm_dag`` backend (``"levels"``, ``"parallel"``, ``"reference"``, ``"triton"``, ``"auto"``).
        normalize: P-mode normalisation (default ``True``; ``False`` only to demonstrate instability).
        source_bias, mark_bias, direct_bias, transition_bias, transition_scale: gate initialisation (each bias
            one number for all heads or a sequence of ``num_heads`` numbers, one per head);
            defaults follow the paper (PAPERS.md section 1.8): sources and marks start small
            (``sigmoid(-4) = 0.018``), the direct term smaller (``sigmoid(-6)``), transitions at
            ``tanh(5 * 1) = 0.9999`` (critical: long paths are open from the start, while the small
            source and mark keep each path's contribution small until training opens them).
        gate_init_std: std of the normal init of the gate weight matrices (small: gates start nearly
            input-independent, at their biases).
        recompute: ``levels`` / ``triton`` backends store no edge states for backward (saves memory).
        fused_gates: compute the gates with the fused Triton kernels of :mod:`plstm_graph.kernels.graph_gates`
            (two launches forward, two backward, instead of ~31 and ~55 small ones). ``None`` (default): on
            CUDA when triton is installed; ``True``: always (on CPU only under ``TRITON_INTERPRET=1``);
            ``False``: the readable torch form (:meth:`gates` documents both). float64 inputs and
            ``torch.compile`` always take the readable form. With the Triton operator too (``backend="triton"``,
            or ``"auto"`` on CUDA), projection, gates and operator run as ONE autograd Function
            (:mod:`plstm_graph.kernels.graph_heads`: ``q, k, v`` read in place, one gradient buffer; tested equal).
        autocast: ``True`` (default): under an enclosing ``torch.autocast`` the projections run in its low
            precision (the gates and the operator's states stay float32 either way); ``False``: the layer
            computes in float32 whatever the autocast state (its input is upcast, its output is float32).
            For small graphs (molecules), where a step is bound by kernel launches, not arithmetic: the
            weight and activation casts that autocast adds in and around the layer cost more launches than
            bf16 saves (the molecule model sets it; README, GPU throughput).

    Shapes:
        x: ``[N, dim]``; edge_attr: ``[E, edge_dim]`` aligned with the schedule's ``edge_index`` columns
        (rows of the user's input ``edge_index`` if the schedule was oriented by ``compile_dag``, see
        ``input_edge_ids``); returns ``[N, dim]``.

    Example:
        >>> import torch, plstm_graph
        >>> from plstm_graph.nn import PLSTMGraphLayer
        >>> s = plstm_graph.compile_dag(torch.tensor([[0, 0, 1, 2], [1, 2, 3, 3]]), num_nodes=4, mode="P")
        >>> layer = PLSTMGraphLayer(dim=16, num_heads=2, mode="P", edge_dim=3)
        >>> layer(torch.randn(4, 16), s, edge_attr=torch.randn(4, 3)).shape
        torch.Size([4, 16])
    """

    # per-node gate pre-activation slots (one linear map of x each, gathered along edges / line edges)
    _NODE_SLOTS = ("src_tail", "src_head", "mark_head", "mark_tail", "tr_in", "tr_mid", "tr_out", "direct")
    _EDGE_SLOTS = ("src", "mark", "tr_in", "tr_out")

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mode: str = "P",
        reverse: bool = False,
        edge_dim: Optional[int] = None,
        head_dim: Optional[int] = None,
        *,
        backend: str = "auto",
        normalize: bool = True,
        source_bias: Union[float, Sequence[float]] = -4.0,
        mark_bias: Union[float, Sequence[float]] = -4.0,
        direct_bias: Union[float, Sequence[float]] = -6.0,
        transition_bias: Union[float, Sequence[float]] = 1.0,
        transition_scale: float = 5.0,
        gate_init_std: float = 0.02,
        recompute: bool = False,
        fused_gates: Optional[bool] = None,
        autocast: bool = True,
    ):
        super().__init__()
        if mode not in ("P", "D"):
            raise ValueError(f"mode must be 'P' or 'D', got {mode!r}")
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}; pass head_dim")
            head_dim = dim // num_heads
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.mode, self.reverse, self.edge_dim = mode, reverse, edge_dim
        self.backend, self.normalize, self.recompute = backend, normalize, recompute
        self.fused_gates, self.autocast = fused_gates, bool(autocast)
        self.init = dict(
            source=source_bias, mark=mark_bias, direct=direct_bias, transition=transition_bias,
            std=gate_init_std,
        )
        self.transition_scale = transition_scale
        hk = num_heads * head_dim
        self.q_proj = nn.Linear(dim, hk, bias=False)
        self.k_proj = nn.Linear(dim, hk, bias=False)
        self.v_proj = nn.Linear(dim, hk, bias=False)
        self.gate_node = nn.Linear(dim, num_heads * len(self._NODE_SLOTS), bias=False)
        self.gate_edge = (
            nn.Linear(edge_dim, num_heads * len(self._EDGE_SLOTS), bias=False) if edge_dim else None
        )
        self.source_bias = nn.Parameter(torch.empty(num_heads))
        self.transition_bias = nn.Parameter(torch.empty(num_heads))
        self.mark_bias = nn.Parameter(torch.empty(num_heads))
        self.direct_bias = nn.Parameter(torch.empty(num_heads))
        self.norm = MultiHeadRMSNorm(num_heads, head_dim)
        self.out_proj = nn.Linear(hk, dim, bias=False)
        for name in ("source", "transition", "mark", "direct"):
            self._bias_init(name)  # a wrong number of per-head values fails here, not in reset_parameters
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(lin.weight)
        nn.init.normal_(self.gate_node.weight, std=self.init["std"])
        if self.gate_edge is not None:
            nn.init.normal_(self.gate_edge.weight, std=self.init["std"])
        with torch.no_grad():
            for name in ("source", "transition", "mark", "direct"):
                getattr(self, f"{name}_bias").copy_(self._bias_init(name))
        self.norm.reset_parameters()

    def _bias_init(self, name: str) -> torch.Tensor:
        """``[H]`` initial bias of gate ``name``: one number for every head, or one number per head."""
        value = torch.as_tensor(self.init[name], dtype=torch.float32).flatten()
        if value.numel() not in (1, self.num_heads):
            raise ValueError(f"{name}_bias needs one value or num_heads={self.num_heads} values, got {value.numel()}")
        return value.expand(self.num_heads)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, mode={self.mode!r}, "
            f"reverse={self.reverse}, edge_dim={self.edge_dim}, backend={self.backend!r}, "
            f"normalize={self.normalize}"
        )

    # ------------------------------------------------------------------ gates
    def _edge_features(self, edge_attr: Optional[torch.Tensor], schedule: DAGSchedule,
                       edge_preact: Optional[torch.Tensor] = None):
        """``[E_in, H * 4]`` edge gate pre-activations ``gate_edge(edge_attr)``, one row per row of ``edge_attr``
        (checked against the schedule), or ``None`` without edge features; ``edge_preact``: that product if the
        caller already has it (:class:`~plstm_graph.nn.PLSTMGraphStack` makes every block's in one GEMM)."""
        if self.gate_edge is None:
            if edge_attr is not None:
                raise ValueError("edge_attr given but the layer was built with edge_dim=None")
            return None
        if edge_attr is None:
            raise ValueError(f"the layer was built with edge_dim={self.edge_dim}; pass edge_attr [E, {self.edge_dim}]")
        if edge_attr.dim() == 1:
            edge_attr = edge_attr[:, None]
        # rows: one per schedule edge, or (oriented schedule) any number that input_edge_ids indexes into
        rows = schedule.num_edges if schedule.input_edge_ids is None else edge_attr.size(0)
        if edge_attr.shape != (rows, self.edge_dim):
            raise ValueError(
                f"edge_attr has shape {list(edge_attr.shape)}, expected [{schedule.num_edges}, {self.edge_dim}]"
            )
        return self.gate_edge(edge_attr) if edge_preact is None else edge_preact

    def _edge_gate_features(self, edge_attr: Optional[torch.Tensor], schedule: DAGSchedule,
                            edge_preact: Optional[torch.Tensor] = None):
        """:meth:`_edge_features` gathered to the schedule's edges: ``[E, H, 4]`` (at least float32) or ``None``."""
        pre = self._edge_features(edge_attr, schedule, edge_preact)
        if pre is None:
            return None
        if schedule.input_edge_ids is not None:  # schedule oriented from the user's edge_index
            pre = pre[schedule.input_edge_ids]
        return _at_least_fp32(pre).view(schedule.num_edges, self.num_heads, len(self._EDGE_SLOTS))

    def gates(
        self, x: torch.Tensor, schedule, edge_attr: Optional[torch.Tensor] = None
    ) -> GraphGates:
        """The (normalised) gates this layer feeds to the operator, in float32.

        Shapes: x ``[N, dim]``; returns :class:`GraphGates` with source, mark ``[E, H]``, transition
        ``[L, H]``, direct ``[N, H]``.
        """
        schedule = resolve_schedule(schedule, self.mode, self.reverse)
        return self._gates(x, schedule, edge_attr)

    def _fused_gates(self, node_preact: torch.Tensor) -> bool:
        """Whether :meth:`_gates` takes the fused Triton kernels (see ``fused_gates`` in the class docstring)."""
        return use_fused_kernel(self.fused_gates, node_preact, "fused_gates=True")

    def _gates(self, x: torch.Tensor, schedule: DAGSchedule, edge_attr,
               node_preact: Optional[torch.Tensor] = None, edge_preact: Optional[torch.Tensor] = None) -> GraphGates:
        """``node_preact``: ``gate_node(x)`` if the caller already has it (``[N, H * 8]``, from the fused
        projection of :meth:`heads`); ``edge_preact``: ``gate_edge(edge_attr)`` likewise."""
        n, h = x.size(0), self.num_heads
        if n != schedule.num_nodes:
            raise ValueError(f"x has {n} rows but the schedule has {schedule.num_nodes} nodes")
        if node_preact is None:
            node_preact = self.gate_node(x)
        if self._fused_gates(node_preact):
            pre = self._edge_features(edge_attr, schedule, edge_preact)  # [E_in, H * 4] or None
            return GraphGates(*_kgates().graph_gates_triton(
                node_preact, pre, self.source_bias, self.mark_bias, self.transition_bias, self.direct_bias,
                schedule.edge_index, schedule.line_index, schedule.input_edge_ids, h, self.transition_scale,
                self.mode == "P" and self.normalize))
        g = _at_least_fp32(node_preact).view(n, h, len(self._NODE_SLOTS))  # [N, H, 8], fp32 under autocast
        e = self._edge_gate_features(edge_attr, schedule, edge_preact)  # [E, H, 4] or None
        tail, head = schedule.edge_index  # [E]
        line_a, line_b = schedule.line_index  # [L]
        # Every slot read along an edge comes from one row gather per endpoint (g_tail, g_head: one gather and
        # one index_put in backward each, not one per slot), and slots are split off with unbind (one stack in
        # backward) rather than a select per slot (a zeros + copy each in backward). For a line edge
        # (a: x -> u, b: u -> w): x = tail(a), the shared node u = tail(b), w = head(b). The values and the
        # order of the sums are those of gathering every slot from g directly (tested).
        gt, gh = g[tail].unbind(-1), g[head].unbind(-1)  # 8 x [E, H]
        s = gt[0] + gh[1] + self.source_bias  # [E, H]
        m = gh[2] + gt[3] + self.mark_bias  # [E, H]
        t = gt[4][line_a] + gt[5][line_b] + gh[6][line_b] + self.transition_bias  # [L, H]
        d = g[:, :, 7] + self.direct_bias  # [N, H]
        if e is not None:
            es = e.unbind(-1)
            s = s + es[0]
            m = m + es[1]
            t = t + es[2][line_a] + es[3][line_b]
        source = torch.sigmoid(s)
        transition = torch.tanh(self.transition_scale * t)
        mark = torch.sigmoid(m)
        direct = torch.sigmoid(d)
        if self.mode == "P" and self.normalize:
            source = p_normalize(source, tail, n)
            transition = p_normalize(transition, line_a, schedule.num_edges)
        return GraphGates(source, transition, mark, direct)

    # ------------------------------------------------------------------ forward
    def project(self, x: torch.Tensor):
        """``(q_proj(x), k_proj(x), v_proj(x), gate_node(x))`` (before scaling and reshaping) as ONE matrix
        product with the four weights stacked: one cast of ``x`` and one GEMM under autocast instead of four
        each, and one GEMM per gradient in backward. The parameters stay four ``Linear`` modules (checkpoints
        and the readable per-projection form unchanged; tested equal to it).

        Shapes: x ``[N, dim]`` -> ``[N, H*K]`` x 3 and ``[N, H*8]`` (column slices of one ``[N, 3*H*K + 8*H]``).
        """
        mods = (self.q_proj, self.k_proj, self.v_proj, self.gate_node)
        return self._projection(x).split([m.out_features for m in mods], dim=-1)

    def _projection(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, 3*H*K + 8*H]``: the unsplit product of :meth:`project`."""
        weight = torch.cat([m.weight for m in (self.q_proj, self.k_proj, self.v_proj, self.gate_node)])
        return nn.functional.linear(x, weight)

    def _merged_heads(self, x: torch.Tensor) -> bool:
        """Whether :meth:`heads` runs as one fused Function (:mod:`plstm_graph.kernels.graph_heads`): the fused
        gates (``fused_gates``) and the Triton operator (``backend="triton"``, or ``"auto"`` on CUDA)."""
        if not self._fused_gates(x):
            return False
        if self.backend == "auto":
            from ..ops.dag import _auto_takes_triton

            return _auto_takes_triton(x)  # the operator's own "auto" rule
        return self.backend == "triton"

    def heads(self, x: torch.Tensor, schedule, edge_attr: Optional[torch.Tensor] = None,
              edge_preact: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The operator output per head, before the per-head norm: ``[N, dim] -> [N, H, V]``.
        ``edge_preact``: ``gate_edge(edge_attr)`` if the caller already has it (see :meth:`_edge_features`)."""
        schedule = resolve_schedule(schedule, self.mode, self.reverse)
        n, h, hd = x.size(0), self.num_heads, self.head_dim
        if self._merged_heads(x):  # projection -> gates -> operator in one Function (same numbers; tested)
            from ..kernels.graph_heads import graph_heads_triton

            biases = (self.source_bias, self.mark_bias, self.transition_bias, self.direct_bias)
            return graph_heads_triton(
                self._projection(x), self._edge_features(edge_attr, schedule, edge_preact), biases, schedule, h, hd,
                hd ** -0.5, self.transition_scale, self.mode == "P" and self.normalize, recompute=self.recompute)
        q, k, v, g = self.project(x)
        gates = self._gates(x, schedule, edge_attr, node_preact=g, edge_preact=edge_preact)
        q = q.view(n, h, hd) * (hd ** -0.5)
        k = k.view(n, h, hd)
        v = v.view(n, h, hd)
        # gates stay fp32 (a bf16 rounding could lift a normalised sum above 1); the operator accumulates
        # in fp32 and returns v's dtype (bf16 under autocast)
        return _operator()(
            q, k, v, gates.source, gates.transition, gates.mark, gates.direct, schedule,
            backend=self.backend, recompute=self.recompute,
        )

    def forward(
        self, x: torch.Tensor, schedule: Union[DAGSchedule, "torch_geometric.data.Data"],
        edge_attr: Optional[torch.Tensor] = None, edge_preact: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if not getattr(self, "autocast", True) and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):  # float32 inside, whatever the caller's autocast
                up = (lambda t: t if t is None or not t.is_floating_point() else _at_least_fp32(t))  # noqa: E731
                return self.forward(up(x), schedule, up(edge_attr), up(edge_preact))
        y = self.heads(x, schedule, edge_attr, edge_preact)  # [N, H, V]
        y = self.norm(y)
        return self.out_proj(y.reshape(x.size(0), self.num_heads * self.head_dim))
