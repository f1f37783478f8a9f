"""Level-batched pLSTM DAG operator: one batched step per topological level, hand-written backward.

Forward (all edges of a level at once; ``a`` always lies on an earlier level than ``b``):

    C      = source[:, :, None, None] * (k[tail] outer v[tail])           # every edge's source term
    for level in 1 .. num_levels - 1:                                      # line edges into this level
        C[b] += transition[(a, b)] * C[a]                                 # gather, scale, index_add
    y      = direct * (q . k) * v  +  index_add over heads of mark[a] * (q[head(a)]^T C[a])

Backward walks the levels in reverse with the transposed line graph:

    dC     = mark[:, :, None, None] * (q[head] outer dy[head])
    for level in num_levels - 1 .. 0:                                      # line edges out of this level
        dC[a] += transition[(a, b)] * dC[b];   dtransition[(a, b)] = <C[a], dC[b]>

and then every other gradient is one batched contraction over edges or nodes. No autograd graph is
built per level; the forward stores only the states ``C`` (``[E, H, K, V]``, float32 for half inputs), or
nothing at all with ``recompute=True`` (the backward recomputes them: one extra forward sweep).
"""
from __future__ import annotations

import torch

from ...graph.schedule import DAGSchedule

__all__ = ["plstm_dag_levels"]


def _plan(schedule: DAGSchedule):
    """Per-call-invariant index arrays, cached on the schedule."""
    plan = schedule.cache.get("levels")
    if plan is None:
        tails, heads = schedule.edge_index
        la, lb = schedule.line_index
        plan = dict(
            tails=tails,
            heads=heads,
            # forward: line edges grouped by the level of b
            fa=la[schedule.line_order_b], fb=lb[schedule.line_order_b], fl=schedule.line_order_b,
            # backward: line edges grouped by the level of a
            ba=la[schedule.line_order_a], bb=lb[schedule.line_order_a], bl=schedule.line_order_a,
        )
        schedule.cache["levels"] = plan
    return plan


def _row_add_(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[index] += src`` over rows, duplicates summed. On CPU ``index_add_`` of a 4-D tensor lowers to a
    scatter with a fully expanded index (several times slower than accumulate-``index_put_`` on a 2-D view);
    on GPU ``index_add_`` (atomics) is the fast one."""
    if dst.is_cuda:
        dst.index_add_(0, index, src)
    else:
        dst.view(dst.shape[0], -1).index_put_((index,), src.reshape(src.shape[0], -1), accumulate=True)


def _states_fwd(k, v, source, transition, schedule: DAGSchedule, plan) -> torch.Tensor:
    t = plan["tails"]
    states = (source[:, :, None] * k[t])[..., None] * v[t][..., None, :]  # [E, H, K, V], one full-size pass
    ptr = schedule.line_ptr_b
    trans_sorted = transition[plan["fl"]]  # [L, H], grouped by the level of b
    for lvl in range(1, schedule.num_levels):
        l0, l1 = ptr[lvl], ptr[lvl + 1]
        if l0 == l1:
            continue
        a = plan["fa"][l0:l1]
        _row_add_(states, plan["fb"][l0:l1], trans_sorted[l0:l1, :, None, None] * states[a])
    return states


class _PLSTMDagLevels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, source, transition, mark, direct, schedule, recompute):
        with torch.autocast(device_type=q.device.type, enabled=False):
            plan = _plan(schedule)
            states = _states_fwd(k, v, source, transition, schedule, plan)
            h = plan["heads"]
            read = torch.einsum("ehk,ehkv->ehv", q[h], states) * mark[:, :, None]  # [E, H, V]
            y = direct[:, :, None] * (q * k).sum(-1, keepdim=True) * v
            y = y.index_add(0, h, read)
        ctx.schedule, ctx.recompute = schedule, recompute
        if recompute:
            ctx.save_for_backward(q, k, v, source, transition, mark, direct)
        else:
            ctx.save_for_backward(q, k, v, source, transition, mark, direct, states)
        return y

    @staticmethod
    def backward(ctx, dy):
        schedule = ctx.schedule
        if ctx.recompute:
            q, k, v, source, transition, mark, direct = ctx.saved_tensors
        else:
            q, k, v, source, transition, mark, direct, states = ctx.saved_tensors
        with torch.autocast(device_type=q.device.type, enabled=False):
            plan = _plan(schedule)
            if ctx.recompute:
                states = _states_fwd(k, v, source, transition, schedule, plan)
            dy = dy.contiguous()
            t, h = plan["tails"], plan["heads"]
            q_h, dy_h = q[h], dy[h]  # [E, H, K], [E, H, V]
            # seed: every edge is read out at its head
            d_states = (mark[:, :, None] * q_h)[..., None] * dy_h[..., None, :]  # [E, H, K, V]
            d_trans = torch.zeros_like(transition)
            ptr = schedule.line_ptr_a
            trans_sorted = transition[plan["bl"]]
            for lvl in range(schedule.num_levels - 1, -1, -1):
                l0, l1 = ptr[lvl], ptr[lvl + 1]
                if l0 == l1:
                    continue
                a, b = plan["ba"][l0:l1], plan["bb"][l0:l1]
                d_b = d_states[b]  # final: b lies on a later level than a
                d_trans[plan["bl"][l0:l1]] = torch.einsum("lhkv,lhkv->lh", states[a], d_b)
                _row_add_(d_states, a, trans_sorted[l0:l1, :, None, None] * d_b)
            # mark and q through the readout
            state_dy = torch.einsum("ehkv,ehv->ehk", states, dy_h)  # C_a dy_n  [E, H, K]
            d_mark = (state_dy * q_h).sum(-1)
            qk = (q * k).sum(-1)  # [N, H]
            dyv = (dy * v).sum(-1)  # [N, H]
            d_q = (direct * dyv)[..., None] * k
            d_q = d_q.index_add(0, h, mark[..., None] * state_dy)
            # source, k, v through the source outer products
            k_t, v_t = k[t], v[t]
            dstate_v = torch.einsum("ehkv,ehv->ehk", d_states, v_t)  # [E, H, K]
            dstate_k = torch.einsum("ehkv,ehk->ehv", d_states, k_t)  # [E, H, V]
            d_source = (dstate_v * k_t).sum(-1)
            d_k = (direct * dyv)[..., None] * q
            d_k = d_k.index_add(0, t, source[..., None] * dstate_v)
            d_v = (direct * qk)[..., None] * dy
            d_v = d_v.index_add(0, t, source[..., None] * dstate_k)
            d_direct = qk * dyv
        return d_q, d_k, d_v, d_source, d_trans, d_mark, d_direct, None, None


def plstm_dag_levels(q, k, v, source, transition, mark, direct, schedule: DAGSchedule, recompute: bool = False):
    """Level-batched operator; same contract as :func:`plstm_graph.plstm_dag`. Inputs must share one dtype
    (the dispatcher upcasts half precision to float32 before calling)."""
    return _PLSTMDagLevels.apply(q, k, v, source, transition, mark, direct, schedule, recompute)
