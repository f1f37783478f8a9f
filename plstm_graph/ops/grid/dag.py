"""The grid as a DAG: ``grid_dag(Y, X)`` builds the schedule of SPEC section 5 and the maps that turn
grid gates ``[B, Y, X, H]`` into the DAG operator's ``source / transition / mark / direct`` arrays.

Nodes are numbered ``n = (b * Y + y) * X + x`` (a batch is a disjoint union of ``batch`` grids).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...graph import DAGSchedule, compile_dag

__all__ = ["GridDAG", "grid_dag"]

# transition kinds, in the order of GridDAG.to_dag_gates's stacking
_RR, _RD, _DD, _DR = 0, 1, 2, 3


@dataclass(frozen=True, eq=False)
class GridDAG:
    """A grid's DAG schedule and the index maps between grid gates and DAG gates.

    Attributes:
        schedule: the compiled :class:`DAGSchedule` (every line edge; ``mode`` as requested).
        edge_is_down: ``[E]`` bool; edge ``e`` is ``d(x, y)`` (else ``r(x, y)``).
        edge_tail: ``[E]`` long, the node an edge leaves (where its source is read).
        edge_head: ``[E]`` long, the node it enters (where its mark is read).
        line_node: ``[L]`` long, the node a line edge passes through (where its transition is read).
        line_kind: ``[L]`` long, 0 = rr, 1 = rd, 2 = dd, 3 = dr.
    """

    Y: int
    X: int
    batch: int
    schedule: DAGSchedule
    edge_is_down: torch.Tensor
    edge_tail: torch.Tensor
    edge_head: torch.Tensor
    line_node: torch.Tensor
    line_kind: torch.Tensor

    def to_dag_gates(self, source_r, source_d, trans_rr, trans_rd, trans_dd, trans_dr, mark_r, mark_d, direct):
        """Grid gates ``[B, Y, X, H]`` -> ``(source [E, H], transition [L, H], mark [E, H], direct [N, H])``."""
        H = source_r.shape[-1]
        flat = lambda t: t.reshape(-1, H)  # noqa: E731  [N, H]
        src = torch.where(self.edge_is_down[:, None], flat(source_d)[self.edge_tail], flat(source_r)[self.edge_tail])
        mark = torch.where(self.edge_is_down[:, None], flat(mark_d)[self.edge_head], flat(mark_r)[self.edge_head])
        trans_all = torch.stack([flat(t) for t in (trans_rr, trans_rd, trans_dd, trans_dr)], dim=1)  # [N, 4, H]
        trans = trans_all[self.line_node, self.line_kind]
        return src, trans, mark, flat(direct)

    @staticmethod
    def to_dag_nodes(t: torch.Tensor) -> torch.Tensor:
        """``[B, Y, X, H, F]`` -> ``[N, H, F]``."""
        return t.reshape(-1, *t.shape[3:])

    def from_dag_nodes(self, t: torch.Tensor) -> torch.Tensor:
        """``[N, H, F]`` -> ``[B, Y, X, H, F]``."""
        return t.reshape(self.batch, self.Y, self.X, *t.shape[1:])


def grid_dag(Y: int, X: int, batch: int = 1, mode: str = "P") -> GridDAG:
    """The DAG of ``batch`` disjoint ``Y x X`` grids with right and down edges (SPEC section 5).

    Example:
        >>> g = grid_dag(2, 3)
        >>> g.schedule.num_nodes, g.schedule.num_edges, g.schedule.num_line_edges
        (6, 7, 6)
    """
    if Y < 1 or X < 1 or batch < 1:
        raise ValueError(f"grid_dag needs Y, X, batch >= 1, got Y={Y}, X={X}, batch={batch}")
    node = torch.arange(batch * Y * X).reshape(batch, Y, X)
    right_t, right_h = node[:, :, :-1].reshape(-1), node[:, :, 1:].reshape(-1)
    down_t, down_h = node[:, :-1, :].reshape(-1), node[:, 1:, :].reshape(-1)
    tails = torch.cat([right_t, down_t])
    heads = torch.cat([right_h, down_h])
    is_down = torch.cat([torch.zeros(right_t.numel(), dtype=torch.bool), torch.ones(down_t.numel(), dtype=torch.bool)])
    schedule = compile_dag(torch.stack([tails, heads]), num_nodes=batch * Y * X, mode=mode)
    la, lb = schedule.line_index
    a_down, b_down = is_down[la], is_down[lb]
    kind = torch.where(a_down, torch.where(b_down, _DD, _DR), torch.where(b_down, _RD, _RR))
    return GridDAG(Y=Y, X=X, batch=batch, schedule=schedule, edge_is_down=is_down, edge_tail=tails,
                   edge_head=heads, line_node=heads[la], line_kind=kind)
