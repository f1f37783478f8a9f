"""Triton kernels of the pLSTM DAG operator (``plstm_dag(..., backend="triton")``).

Math (SPEC section 2), per head, states ``C_e`` in ``R^{K x V}`` on edges, always float32:

    C_b = s_b k_u v_u^T + sum_{l=(a,b)} T_l C_a                     (b = u -> w)
    y_n = d_n (q_n . k_n) v_n + sum_{a -> n} m_a q_n^T C_a

Backward, with ``dC_a`` the adjoint state of edge ``a = x -> n``:

    dC_a = m_a q_n dy_n^T + sum_{l=(a,b)} T_l dC_b
    dT_l = <C_a, dC_b>,  dm_a = q_n^T C_a dy_n,  dq_n += m_a C_a dy_n,
    ds_a = k_x^T dC_a v_x,  dk_x += s_a dC_a v_x,  dv_x += s_a dC_a^T k_x

Kernels. One *edge body* (a ``[K, V]`` tile in registers per program, one head per program) computes a
state from its predecessors through a CSR of incoming line edges (no atomics), or an adjoint state from its
successors through a CSR of outgoing line edges; one *node body* reads the states out through a CSR of
incoming edges per node (no atomics in the forward; the backward accumulates ``dq, dk, dv`` with fp32
atomics). A program walks a *list* of edges sequentially (``tl.debug_barrier`` between items, states
loaded with ``.cg`` so they come from L2, where the previous item of the same program wrote them):

* ``strategy="graph"`` (batches of small graphs, e.g. molecules): ONE launch for the whole forward (each
  program = one graph x one head walks that graph's edges in topological order, then its nodes) and one
  launch for the backward (reverse order). No per-level launches at all.
* ``strategy="levels"`` (large connected DAGs): one launch per topological level, one edge per program
  (all edges of the level in parallel), then one launch for every readout.

Node, edge, level and graph counts are runtime arguments (never ``constexpr``): only ``K, V``, the block
sizes and two flags specialise a kernel, so changing batches never recompiles.

Memory (states are ``H*K*V*4`` bytes per edge; 16 KB for H=4, K=V=32, i.e. 16 GB for 1M edges):

* ``recompute=False``: the forward keeps every state ``C`` for the backward; the backward also holds
  every adjoint state ``dC``: peak ~ ``2 E H K V * 4`` bytes on top of inputs and gradients.
* ``recompute=True``, ``graph`` strategy: the graphs are processed in chunks whose states fit
  ``chunk_bytes`` (default 512 MiB): the forward computes a chunk's states into one reused buffer, reads
  them out and drops them; the backward recomputes a chunk's states, then runs its adjoint sweep. Graphs
  are independent, so this is exact; the peak is ``2 * chunk_bytes`` (C and dC of one chunk) whatever the
  number of edges (1M molecule edges, H=4, K=V=32: ~6 GB with inputs and gradients).
* ``recompute=True``, ``levels`` strategy (large connected DAGs): level *segments* with checkpoints. The
  forward runs segment by segment and keeps, per segment, one checkpoint *piece*: the states of its edges
  still read after it (head level at or after the next boundary), each state stored once however many
  boundaries it crosses. ``X_j``, the states that cross into segment ``j`` from earlier levels (edges with
  ``level(tail) < c_j <= level(head)``; a state is last read at the level of its head), is gathered from
  the pieces. The backward walks the segments from the last: it frees the pieces nothing reads any more,
  restores ``X_j``, recomputes the segment's states, and runs the adjoint sweep, carrying ``D_j`` (adjoint
  states of later edges still needed by earlier line edges) to the previous segment. A slot map
  ``slot_of[pos]`` tells the kernels which buffer row holds each state. Peak states: the pieces of the
  segments before ``j`` plus ``2 S_j + |X_j| + |D_{j+1}|`` (``S_j`` edges in segment ``j``), maximised over
  ``j``; the segment size is chosen to minimise it (:func:`_peak_states`, :func:`_segment_cap`). On a
  layered random DAG of 1M edges, 256 levels, 3.98 line edges per edge (``plstm_graph.bench.
  graphs.random_dag``), H=4, K=V=32, that estimate is 5.0 GB of states (16.4 GB if every state were kept);
  measured on an H200 with inputs and gradients: 6.6-7.0 GiB (one checkpoint per boundary: 10.5 GiB).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ._common import next_pow2 as _pow2
from ._common import HAVE_TRITON as _HAVE_TRITON
from ._common import available
from ._common import bind_triton as _bind_triton
from ._common import jit_kernel as _jit_kernel

# triton is imported on first use, never at import: the package works without it, and a test that sets
# TRITON_INTERPRET=1 still gets the CPU interpreter when another module imported this one first.
triton = None
tl = None


def _import_triton():
    return _bind_triton(globals())


__all__ = ["available", "plstm_dag_triton", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 128
DEFAULT_CHUNK_BYTES = 1 << 29  # 512 MiB of states per chunk of graphs (recompute=True)




# launch offsets change with every level / chunk: never specialise on their values (no recompiles); launches go
# through _common.FastLaunch (Triton's argument binding skipped after the first launch of a variant)
_FWD_FREE = ["e_base", "n_base", "slot_base"]
_BWD_FREE = ["e_base", "slot_base"]
# index arrays (views into a batch's packed buffer: their alignment changes with the batch)
_INDEX = ["tails", "heads", "e_items", "e_pptr", "in_ptr", "in_pos", "in_line", "n_items", "n_pptr", "nin_ptr",
          "nin_pos", "out_ptr", "out_pos", "out_line", "slot_of"]


def _kernel(fn, free=()):
    """``fn`` jitted (counts in ``free`` and the index arrays never specialised) behind a FastLaunch."""
    return _jit_kernel(fn, _import_triton, free=free, no_align=_INDEX)


def _fwd_kernel(q, k, v, src, trans, mark, direct, y, state, tails,
                e_items, e_pptr, e_base, in_ptr, in_pos, in_line,
                n_items, n_pptr, n_base, nin_ptr, nin_pos, slot_base, slot_of, H, q_rs, k_rs, v_rs, qs,
                K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                DO_EDGES: tl.constexpr, DO_NODES: tl.constexpr, USE_SLOTS: tl.constexpr):
    """Program (p, h): the edges at positions e_pptr[e_base+p] .. e_pptr[e_base+p+1] in order (states),
    then the nodes n_items[n_pptr[n_base+p] .. n_pptr[n_base+p+1]] (readout). One head per program.

    The state of the edge at position ``pos`` lives in row ``pos - slot_base`` of ``state``, or in row
    ``slot_of[pos]`` with ``USE_SLOTS`` (segments of the levels strategy with recomputation). Rows of ``q, k, v``
    are ``q_rs, k_rs, v_rs`` elements apart (heads ``K`` / ``V`` apart: column slices of a wider projection are
    read in place); ``q`` is read times ``qs`` (the layer's ``K^-0.5``)."""
    p = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offk = tl.arange(0, BK)
    offv = tl.arange(0, BV)
    mk = offk < K
    mv = offv < V
    tile = offk[:, None] * V + offv[None, :]
    mt = mk[:, None] & mv[None, :]
    if DO_EDGES:
        i0 = tl.load(e_pptr + e_base + p)
        i1 = tl.load(e_pptr + e_base + p + 1)
        b_pos = i0.to(tl.int64)
        while b_pos < i1:
            # C_b = s_b k_u v_u^T + sum_{l=(a,b)} T_l C_a
            b = tl.load(e_items + b_pos).to(tl.int64)
            u = tl.load(tails + b).to(tl.int64)
            kk = tl.load(k + u * k_rs + h * K + offk, mask=mk, other=0.0).to(tl.float32)
            vv = tl.load(v + u * v_rs + h * V + offv, mask=mv, other=0.0).to(tl.float32)
            s = tl.load(src + b * H + h).to(tl.float32)
            c = s * (kk[:, None] * vv[None, :])
            j = tl.load(in_ptr + b_pos)
            j1 = tl.load(in_ptr + b_pos + 1)
            while j < j1:
                a_pos = tl.load(in_pos + j).to(tl.int64)
                li = tl.load(in_line + j).to(tl.int64)
                t = tl.load(trans + li * H + h).to(tl.float32)
                if USE_SLOTS:
                    sa = tl.load(slot_of + a_pos).to(tl.int64)
                else:
                    sa = a_pos - slot_base
                ca = tl.load(state + (sa * H + h) * (K * V) + tile, mask=mt, other=0.0, cache_modifier=".cg")
                c += t * ca
                j += 1
            if USE_SLOTS:
                sb = tl.load(slot_of + b_pos).to(tl.int64)
            else:
                sb = b_pos - slot_base
            tl.store(state + (sb * H + h) * (K * V) + tile, c, mask=mt)
            tl.debug_barrier()  # the next edge of this program may read C_b
            b_pos += 1
    if DO_NODES:
        i = tl.load(n_pptr + n_base + p)
        i1 = tl.load(n_pptr + n_base + p + 1)
        while i < i1:
            # y_n = d_n (q_n . k_n) v_n + sum_{a -> n} m_a q_n^T C_a
            n = tl.load(n_items + i).to(tl.int64)
            qq = tl.load(q + n * q_rs + h * K + offk, mask=mk, other=0.0).to(tl.float32) * qs
            kk = tl.load(k + n * k_rs + h * K + offk, mask=mk, other=0.0).to(tl.float32)
            vv = tl.load(v + n * v_rs + h * V + offv, mask=mv, other=0.0).to(tl.float32)
            d = tl.load(direct + n * H + h).to(tl.float32)
            acc = (d * tl.sum(qq * kk, axis=0)) * vv
            j = tl.load(nin_ptr + n)
            j1 = tl.load(nin_ptr + n + 1)
            while j < j1:
                a_pos = tl.load(nin_pos + j).to(tl.int64)
                a = tl.load(e_items + a_pos).to(tl.int64)
                m = tl.load(mark + a * H + h).to(tl.float32)
                if USE_SLOTS:
                    sa = tl.load(slot_of + a_pos).to(tl.int64)
                else:
                    sa = a_pos - slot_base
                ca = tl.load(state + (sa * H + h) * (K * V) + tile, mask=mt, other=0.0, cache_modifier=".cg")
                acc += m * tl.sum(qq[:, None] * ca, axis=0)
                j += 1
            tl.store(y + (n * H + h) * V + offv, acc, mask=mv)
            i += 1

def _direct_bwd_kernel(q, k, v, dy, direct, dq, dk, dv, ddirect, R, H, q_rs, k_rs, v_rs, dq_rs, dk_rs, dv_rs, qs,
                       K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BR: tl.constexpr):
    """Direct term of the backward, ``BR`` (node, head) rows per program (``R = N * H`` rows): with
    ``y_n = d_n (q_n . k_n) v_n``, ``dq = d (dy . v) k``, ``dk = d (dy . v) q``, ``dv = d (q . k) dy`` and
    ``ddirect = (q . k)(dy . v)``, stored (float32) as the start the edge kernels accumulate on. Row ``r`` is
    node ``r // H``, head ``r % H``; node rows of ``q, k, v, dq, dk, dv`` are ``*_rs`` elements apart (``dy``:
    ``H * V``); ``q`` is read times ``qs`` and ``dq`` is the gradient of the unscaled ``q``."""
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    mr = r < R
    offk = tl.arange(0, BK)
    offv = tl.arange(0, BV)
    mk = mr[:, None] & (offk < K)[None, :]
    mv = mr[:, None] & (offv < V)[None, :]
    node = (r // H)[:, None]
    hk = (r % H)[:, None] * K + offk[None, :]
    hv = (r % H)[:, None] * V + offv[None, :]
    qq = tl.load(q + node * q_rs + hk, mask=mk, other=0.0).to(tl.float32) * qs
    kk = tl.load(k + node * k_rs + hk, mask=mk, other=0.0).to(tl.float32)
    vv = tl.load(v + node * v_rs + hv, mask=mv, other=0.0).to(tl.float32)
    gy = tl.load(dy + r[:, None] * V + offv[None, :], mask=mv, other=0.0).to(tl.float32)
    d = tl.load(direct + r, mask=mr, other=0.0).to(tl.float32)
    qk = tl.sum(qq * kk, axis=1)
    dyv = tl.sum(gy * vv, axis=1)
    tl.store(dq + node * dq_rs + hk, (qs * d * dyv)[:, None] * kk, mask=mk)
    tl.store(dk + node * dk_rs + hk, (d * dyv)[:, None] * qq, mask=mk)
    tl.store(dv + node * dv_rs + hv, (d * qk)[:, None] * gy, mask=mv)
    tl.store(ddirect + r, qk * dyv, mask=mr)


def _bwd_kernel(q, k, v, src, trans, mark, dy, state, dstate, dq, dk, dv, dsrc, dtrans, dmark,
                tails, heads, e_items, e_pptr, e_base, out_ptr, out_pos, out_line, slot_base, slot_of, H,
                q_rs, k_rs, v_rs, dq_rs, dk_rs, dv_rs, qs,
                K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                USE_SLOTS: tl.constexpr):
    """Program (p, h): the edges of positions e_pptr[e_base+p] .. e_pptr[e_base+p+1] in REVERSE order. Row
    strides and ``qs`` as in :func:`_direct_bwd_kernel`."""
    p = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offk = tl.arange(0, BK)
    offv = tl.arange(0, BV)
    mk = offk < K
    mv = offv < V
    tile = offk[:, None] * V + offv[None, :]
    mt = mk[:, None] & mv[None, :]
    i0 = tl.load(e_pptr + e_base + p)
    i1 = tl.load(e_pptr + e_base + p + 1)
    a_pos = i1.to(tl.int64) - 1
    while a_pos >= i0:
        a = tl.load(e_items + a_pos).to(tl.int64)
        n = tl.load(heads + a).to(tl.int64)
        x = tl.load(tails + a).to(tl.int64)
        qn = tl.load(q + n * q_rs + h * K + offk, mask=mk, other=0.0).to(tl.float32) * qs
        dyn = tl.load(dy + (n * H + h) * V + offv, mask=mv, other=0.0).to(tl.float32)
        m = tl.load(mark + a * H + h).to(tl.float32)
        if USE_SLOTS:
            sa = tl.load(slot_of + a_pos).to(tl.int64)
        else:
            sa = a_pos - slot_base
        ca = tl.load(state + (sa * H + h) * (K * V) + tile, mask=mt, other=0.0, cache_modifier=".cg")
        dc = m * (qn[:, None] * dyn[None, :])
        j0 = tl.load(out_ptr + a_pos)
        j1 = tl.load(out_ptr + a_pos + 1)
        j = j0
        while j < j1:
            b_pos = tl.load(out_pos + j).to(tl.int64)
            li = tl.load(out_line + j).to(tl.int64)
            t = tl.load(trans + li * H + h).to(tl.float32)
            if USE_SLOTS:
                sb = tl.load(slot_of + b_pos).to(tl.int64)
            else:
                sb = b_pos - slot_base
            dcb = tl.load(dstate + (sb * H + h) * (K * V) + tile, mask=mt, other=0.0, cache_modifier=".cg")
            tl.store(dtrans + li * H + h, tl.sum(tl.sum(ca * dcb, axis=1), axis=0))
            dc += t * dcb
            j += 1
        tl.store(dstate + (sa * H + h) * (K * V) + tile, dc, mask=mt)
        # readout of a at its head n
        cdy = tl.sum(ca * dyn[None, :], axis=1)  # [BK]: C_a dy_n
        tl.store(dmark + a * H + h, tl.sum(qn * cdy, axis=0))
        tl.atomic_add(dq + n * dq_rs + h * K + offk, (qs * m) * cdy, mask=mk)
        # source outer product at its tail x
        kx = tl.load(k + x * k_rs + h * K + offk, mask=mk, other=0.0).to(tl.float32)
        vx = tl.load(v + x * v_rs + h * V + offv, mask=mv, other=0.0).to(tl.float32)
        s = tl.load(src + a * H + h).to(tl.float32)
        dcv = tl.sum(dc * vx[None, :], axis=1)  # [BK]
        dck = tl.sum(dc * kx[:, None], axis=0)  # [BV]
        tl.store(dsrc + a * H + h, tl.sum(dcv * kx, axis=0))
        tl.atomic_add(dk + x * dk_rs + h * K + offk, s * dcv, mask=mk)
        tl.atomic_add(dv + x * dv_rs + h * V + offv, s * dck, mask=mv)
        tl.debug_barrier()
        a_pos -= 1


# ---------------------------------------------------------------------------------------------- planning
def _csr_by(keys: torch.Tensor, num: int):
    """Stable order of ``keys`` and the CSR pointer ``[num + 1]`` (CPU tensors)."""
    order = torch.sort(keys, stable=True).indices
    ptr = torch.zeros(num + 1, dtype=torch.long)
    if keys.numel():
        ptr[1:] = torch.cumsum(torch.bincount(keys, minlength=num), 0)
    return order, ptr


def _plan(schedule, strategy: str) -> dict:
    """Index arrays of one strategy, built once on the CPU and cached in ``schedule.cache``.

    Works on a schedule of any device; for a CUDA schedule it copies the schedule to the host (syncs), so
    training loops build it on the CPU batch first (:func:`plstm_graph.graph.prepare_batch`) and move it:
    entries ending in ``_cpu`` stay on the host (the launch loop reads them), the rest moves.
    """
    key = "triton_" + strategy
    plan = schedule.cache.get(key)
    if plan is not None:
        return plan
    dev = schedule.device
    n_nodes, n_edges = schedule.num_nodes, schedule.num_edges
    tails, heads = (schedule.edge_index[0].cpu(), schedule.edge_index[1].cpu())
    la, lb = (schedule.line_index[0].cpu(), schedule.line_index[1].cpu())
    elevel = schedule.edge_level.cpu()
    ngraph = max(int(schedule.num_graphs), 1)
    egraph = schedule.edge_graph.cpu()
    gid = schedule.graph_id.cpu()
    if strategy == "graph":
        # edges by (graph, level): every graph's edges contiguous and in topological order
        nl = max(schedule.num_levels, 1)
        e_items = torch.sort(egraph * nl + elevel, stable=True).indices
        e_pptr = torch.zeros(ngraph + 1, dtype=torch.long)
        if n_edges:
            e_pptr[1:] = torch.cumsum(torch.bincount(egraph, minlength=ngraph), 0)
        n_items, n_pptr = _csr_by(gid, ngraph)
    else:
        e_items = schedule.edge_order.cpu()
        e_pptr = torch.arange(n_edges + 1, dtype=torch.long)
        n_items, nptr = _csr_by(schedule.node_level.cpu(), max(schedule.num_levels, 1))  # nodes by level
        n_pptr = torch.arange(n_nodes + 1, dtype=torch.long)
    pos = torch.empty(n_edges, dtype=torch.long)
    pos[e_items] = torch.arange(n_edges)
    lin_order, in_ptr = _csr_by(pos[lb], n_edges)  # line edges grouped by the position of b
    lout_order, out_ptr = _csr_by(pos[la], n_edges)  # ... and by the position of a
    hin_order, nin_ptr = _csr_by(heads, n_nodes)  # edges grouped by head node
    i32 = lambda t: t.to(torch.int32).to(dev)  # noqa: E731
    plan = dict(
        tails=i32(tails), heads=i32(heads),
        e_items=i32(e_items), e_pptr=i32(e_pptr), n_items=i32(n_items), n_pptr=i32(n_pptr),
        in_ptr=i32(in_ptr), in_pos=i32(pos[la[lin_order]]), in_line=i32(lin_order),
        out_ptr=i32(out_ptr), out_pos=i32(pos[lb[lout_order]]), out_line=i32(lout_order),
        nin_ptr=i32(nin_ptr), nin_pos=i32(pos[hin_order]),
        e_pptr_cpu=e_pptr, n_pptr_cpu=n_pptr, num_progs=ngraph if strategy == "graph" else None,
        e_items_cpu=e_items, n_unit=i32(torch.arange(n_nodes + 1)),
    )
    if strategy == "levels":
        plan["node_ptr"] = tuple(int(x) for x in nptr.tolist())
        plan["slot_of"] = torch.zeros(n_edges, dtype=torch.int32, device=dev)
    if strategy == "graph":
        counts = e_pptr[1:] - e_pptr[:-1]
        plan["max_graph_edges"] = int(counts.max()) if counts.numel() else 0
    schedule.cache[key] = plan
    return plan


def _choose_strategy(schedule) -> str:
    plan = schedule.cache.get("triton_strategy")
    if plan is None:
        eg = schedule.edge_graph.cpu()
        counts = torch.bincount(eg, minlength=max(int(schedule.num_graphs), 1)) if eg.numel() else None
        e_max = int(counts.max()) if counts is not None else 0
        # a graph walk costs ~E_max dependent steps in one launch; levels cost one launch per level
        plan = "graph" if e_max <= max(64, 4 * schedule.num_levels) else "levels"
        schedule.cache["triton_strategy"] = plan
    return plan


def _chunks(plan, n_edges: int, state_bytes_per_edge: int, chunk_bytes: int):
    """Contiguous ranges of graphs [g0, g1) whose states fit ``chunk_bytes`` (at least one graph each)."""
    cap = max(1, chunk_bytes // max(state_bytes_per_edge, 1))
    key = ("chunks", cap)
    if key in plan:
        return plan[key]
    ptr = plan["e_pptr_cpu"].tolist()
    ng = len(ptr) - 1
    out, g0 = [], 0
    while g0 < ng:
        g1 = g0 + 1
        while g1 < ng and ptr[g1 + 1] - ptr[g0] <= cap:
            g1 += 1
        out.append((g0, g1))
        g0 = g1
    plan[key] = out
    return out


def _blocks(dk: int, dv: int):
    if dk > MAX_HEAD_DIM or dv > MAX_HEAD_DIM or dk < 1 or dv < 1:
        raise ValueError(
            f"backend='triton' supports head dims 1..{MAX_HEAD_DIM} (a [K, V] state tile per program); got "
            f"K={dk}, V={dv}. Use backend='levels' for larger heads."
        )
    bk, bv = _pow2(dk), _pow2(dv)
    # ~8 tile elements per thread: no register spills up to 64 x 64, small ones at 128 x 128 (ptxas, sm_90;
    # 32 x 32 -> 4 warps, 72 registers)
    warps = min(32, max(1, bk * bv // 256))
    return bk, bv, warps


# ---------------------------------------------------------------------------------------------- drivers
def _run_fwd(q, k, v, src, trans, mark, direct, schedule, plan, strategy, y, state, *, nodes: bool,
             g_range=None, lvl_range=None, slot_of=None, qs: float = 1.0):
    """Compute states (into ``state``) and, if ``nodes``, the readout into ``y``.

    graph strategy: graphs ``g_range = (g0, g1)``; ``state`` holds the states of their edges only.
    levels strategy: levels ``lvl_range = (l0, l1)`` (default all); with ``slot_of`` the state of the edge at
    position ``pos`` is row ``slot_of[pos]`` of ``state`` (else row ``pos``). ``q, k, v``: ``[N, H, K]`` views
    with unit column stride and heads ``K`` apart (rows anywhere, see :func:`_rows`); ``q`` enters times ``qs``.
    """
    H, K, V = q.shape[1], q.shape[2], v.shape[2]
    bk, bv, warps = _blocks(K, V)
    P = plan
    use_slots = slot_of is not None
    common = dict(K=K, V=V, BK=bk, BV=bv, num_warps=warps, USE_SLOTS=use_slots)
    slots = slot_of if use_slots else P["tails"]  # any int32 tensor when unused
    strides = (q.stride(0), k.stride(0), v.stride(0), float(qs))

    def launch(grid, e_base, n_base, slot_base, do_edges, do_nodes, n_pptr="n_pptr"):
        _kernel(_fwd_kernel, _FWD_FREE)[grid](
            q, k, v, src, trans, mark, direct, y, state, P["tails"],
            P["e_items"], P["e_pptr"], e_base, P["in_ptr"], P["in_pos"], P["in_line"],
            P["n_items"], P[n_pptr], n_base, P["nin_ptr"], P["nin_pos"], slot_base, slots, H, *strides,
            DO_EDGES=do_edges, DO_NODES=do_nodes, **common,
        )

    if strategy == "graph":
        g0, g1 = g_range
        if g0 == 0 and g1 == P["num_progs"]:  # every graph (no recompute chunks): no host tensor reads
            slot_base, e1, n0, n1 = 0, schedule.num_edges, 0, schedule.num_nodes
        else:
            slot_base, e1 = int(P["e_pptr_cpu"][g0]), int(P["e_pptr_cpu"][g1])
            n0, n1 = int(P["n_pptr_cpu"][g0]), int(P["n_pptr_cpu"][g1])
        if g1 > g0 and e1 > slot_base:
            launch((g1 - g0, H), g0, 0, slot_base, True, False)  # one program walks one graph's edges
        if nodes and n1 > n0:  # readouts are independent: one node per program
            launch((n1 - n0, H), 0, n0, slot_base, False, True, n_pptr="n_unit")
        return
    l0, l1 = lvl_range if lvl_range is not None else (0, schedule.num_levels)
    ptr = schedule.edge_ptr
    for lvl in range(l0, l1):
        cnt = ptr[lvl + 1] - ptr[lvl]
        if cnt:
            launch((cnt, H), ptr[lvl], 0, 0, True, False)
    nptr = P["node_ptr"]
    if nodes and nptr[l1] > nptr[l0]:
        launch((nptr[l1] - nptr[l0], H), 0, nptr[l0], 0, False, True)


def _run_bwd(q, k, v, src, trans, mark, dy, schedule, plan, strategy, state, dstate, grads, g_range=None,
             lvl_range=None, slot_of=None, qs: float = 1.0):
    """Adjoint sweep (reverse order) over graphs ``g_range`` or levels ``lvl_range``; see :func:`_run_fwd`
    (``dq, dk, dv`` of ``grads``: row-strided like ``q, k, v``)."""
    H, K, V = q.shape[1], q.shape[2], v.shape[2]
    bk, bv, warps = _blocks(K, V)
    dq, dk, dv, dsrc, dtrans, dmark = grads
    P = plan
    use_slots = slot_of is not None
    slots = slot_of if use_slots else P["tails"]
    strides = (q.stride(0), k.stride(0), v.stride(0), dq.stride(0), dk.stride(0), dv.stride(0), float(qs))

    def launch(grid, e_base, slot_base):
        _kernel(_bwd_kernel, _BWD_FREE)[grid](
            q, k, v, src, trans, mark, dy, state, dstate, dq, dk, dv, dsrc, dtrans, dmark,
            P["tails"], P["heads"], P["e_items"], P["e_pptr"], e_base, P["out_ptr"], P["out_pos"], P["out_line"],
            slot_base, slots, H, *strides, K=K, V=V, BK=bk, BV=bv, num_warps=warps, USE_SLOTS=use_slots,
        )

    if strategy == "graph":
        g0, g1 = g_range
        launch((g1 - g0, H), g0, int(P["e_pptr_cpu"][g0]) if g0 else 0)
        return
    l0, l1 = lvl_range if lvl_range is not None else (0, schedule.num_levels)
    ptr = schedule.edge_ptr
    for lvl in range(l1 - 1, l0 - 1, -1):
        cnt = ptr[lvl + 1] - ptr[lvl]
        if cnt:
            launch((cnt, H), ptr[lvl], 0)


def _liveness(schedule, plan):
    """Per position: tail level, head level, first predecessor level; and the live counts across every
    level boundary ``c``: forward carry ``#{a: lvl_t(a) < c <= lvl_h(a)}`` and backward carry
    ``#{b: first_pred(b) < c <= lvl_t(b)}`` (lists of length ``num_levels + 1``)."""
    live = plan.get("liveness_cpu")
    if live is not None:
        return live
    E, nl = schedule.num_edges, schedule.num_levels
    e_items = plan["e_items_cpu"]
    lvl_t = schedule.edge_level.cpu()[e_items]  # by position
    lvl_h = schedule.node_level.cpu()[schedule.edge_index[1].cpu()][e_items]
    pos = torch.empty(E, dtype=torch.long)
    pos[e_items] = torch.arange(E)
    first_pred = lvl_t.clone()  # min level of a over line edges (a, b), per position of b
    if schedule.num_line_edges:
        la, lb = schedule.line_index.cpu()
        first_pred.scatter_reduce_(0, pos[lb], lvl_t[pos[la]], reduce="amin")

    def across(lo, hi):  # #{e: lo(e) < c <= hi(e)} for c = 0 .. nl
        born = torch.bincount(lo + 1, minlength=nl + 2)[: nl + 1]
        dies = torch.bincount(hi + 1, minlength=nl + 2)[: nl + 1]
        return (torch.cumsum(born, 0) - torch.cumsum(dies, 0)).tolist()

    live = dict(lvl_t=lvl_t, lvl_h=lvl_h, first_pred=first_pred, x=across(lvl_t, lvl_h), d=across(first_pred, lvl_t))
    plan["liveness_cpu"] = live  # host tensors: DAGSchedule.to keeps *_cpu entries
    return live


def _bounds(ptr, live_x, nl: int, cap: int):
    """Greedy level segments: grow while segment edges + forward carry <= cap (at least one level)."""
    bounds = [0]
    while bounds[-1] < nl:
        c0 = bounds[-1]
        c1 = c0 + 1
        while c1 < nl and (ptr[c1 + 1] - ptr[c0]) + live_x[c0] <= cap:
            c1 += 1
        bounds.append(c1)
    return bounds


def _pieces_per_segment(live, bounds) -> torch.Tensor:
    """Rows of each segment's checkpoint *piece*: its edges whose state is still read after the segment
    (``level(head) >= c_{j+1}``); the last segment has none."""
    lvl_t, lvl_h = live["lvl_t"], live["lvl_h"]
    b = torch.tensor(bounds)
    seg_of = torch.searchsorted(b, lvl_t, right=True) - 1
    crosses = (lvl_h >= b[seg_of + 1]) & (seg_of + 2 < b.numel())
    return torch.bincount(seg_of[crosses], minlength=b.numel() - 1)


def _peak_states(ptr, live, bounds) -> int:
    """Estimated peak number of live ``[H, K, V]`` states of the levels strategy with recomputation for these
    segment bounds (see :class:`_PLSTMDagTriton`): in the backward of segment ``j`` the pieces of segments
    ``< j``, its state buffer ``S_j + |X_j|``, its adjoint buffer ``S_j + |D_{j+1}|``; then, with the state
    buffer freed, the adjoint buffer and the carry ``D_j`` gathered from it."""
    piece = _pieces_per_segment(live, bounds).tolist()
    x, d = live["x"], live["d"]
    n_seg, kept, peak = len(bounds) - 1, 0, 0
    for j in range(n_seg):
        c0, c1 = bounds[j], bounds[j + 1]
        S = ptr[c1] - ptr[c0]
        d_next = d[c1] if j + 1 < n_seg else 0
        d_here = d[c0] if j else 0
        peak = max(peak, kept + 2 * S + (x[c0] if j else 0) + d_next, kept + S + d_next + d_here)
        kept += piece[j]
    return peak


def _segment_cap(schedule, plan, per_edge: int, chunk_bytes) -> int:
    """Segment size (in states) for the levels strategy with recomputation. Given ``chunk_bytes``: that
    budget. Otherwise the candidate (E/256 .. E, steps of sqrt 2) minimising :func:`_peak_states`."""
    if chunk_bytes:
        return max(1, int(chunk_bytes) // per_edge)
    key = "auto_cap"
    if key in plan:
        return plan[key]
    live = _liveness(schedule, plan)
    ptr, nl, E = schedule.edge_ptr, schedule.num_levels, schedule.num_edges
    best = None
    cap = max(1.0, E / 256)
    while True:
        c = min(E, int(cap))
        peak = _peak_states(ptr, live, _bounds(ptr, live["x"], nl, c))
        if best is None or peak < best[0]:
            best = (peak, c)
        if c >= E:
            break
        cap *= 2 ** 0.5
    plan[key] = best[1]
    return best[1]


def _segments(schedule, plan, cap: int):
    """Level segments of the levels strategy with recomputation, each holding at most ~``cap`` states.

    Positions are the level order of edges, so segment ``j`` (levels ``c_j .. c_{j+1}-1``) owns the
    contiguous positions ``P_j .. P_{j+1}-1``. Besides its own states it needs

    * ``X_j`` (forward carry): the states of earlier edges still read in the segment, i.e.
      ``level(tail a) < c_j <= level(head a)`` (a state is last read at the level of its head node, by its
      readout and by every line edge leaving it). Each such state is checkpointed ONCE, in the *piece* of
      the segment that computed it (its edges read after the segment); ``X_j`` is gathered from the pieces
      of the segments before ``j``, in position order;
    * ``D_j`` (backward carry): adjoint states of later edges ``b`` still read by an edge ``a`` of this
      segment or before, i.e. ``level(b) >= c_{j+1} > min over line edges (a, b) of level(a)``.

    Rows: segment edges ``0 .. S-1``, carries after them. Returned per segment: level range, ``S``, the slot
    update ``(idx, val)`` for ``slot_of``, ``piece_src`` (its rows that form its piece), ``x_from`` (pairs
    ``(i, rows of piece i)`` that build ``X_j``) and ``bwd_gather`` (rows of its adjoint buffer that form
    ``D_{j-1}``).
    """
    key = ("segments", cap)
    if key in plan:
        return plan[key]
    dev = schedule.device
    E = schedule.num_edges
    ptr = schedule.edge_ptr
    live = _liveness(schedule, plan)
    lvl_t, lvl_h, first_pred = live["lvl_t"], live["lvl_h"], live["first_pred"]
    bounds = _bounds(ptr, live["x"], schedule.num_levels, cap)
    segs = []
    for j in range(len(bounds) - 1):
        c0, c1 = bounds[j], bounds[j + 1]
        p0, p1 = ptr[c0], ptr[c1]
        x_pos = torch.nonzero((lvl_t < c0) & (lvl_h >= c0)).flatten()
        d_pos = torch.nonzero((lvl_t >= c1) & (first_pred < c1)).flatten()
        S = p1 - p0
        idx = torch.cat([torch.arange(p0, p1), x_pos, d_pos])
        val = torch.cat([torch.arange(S), S + torch.arange(x_pos.numel()), S + torch.arange(d_pos.numel())])
        sg = dict(levels=(c0, c1), S=S, x_pos=x_pos, d_pos=d_pos, idx=idx, val=val)
        if j + 2 < len(bounds):
            sg["piece_pos"] = p0 + torch.nonzero(lvl_h[p0:p1] >= c1).flatten()  # positions, ascending
            sg["piece_src"] = sg["piece_pos"] - p0  # their rows in this segment's buffer
            sg["piece_last"] = int(lvl_h[sg["piece_pos"]].max()) if sg["piece_pos"].numel() else -1
        x_from, got = [], []
        for i, earlier in enumerate(segs):
            if earlier.get("piece_last", -1) < c0:  # every state of that piece was last read before c0
                continue
            rows = torch.nonzero(lvl_h[earlier["piece_pos"]] >= c0).flatten()
            if rows.numel():
                x_from.append((i, rows))
                got.append(earlier["piece_pos"][rows])
        assert torch.equal(torch.cat(got) if got else x_pos, x_pos), "checkpoint pieces do not cover X_j"
        sg["x_from"] = x_from
        segs.append(sg)
    # rows of segment j's adjoint buffer that hold D_{j-1} (segment j's map), to chain the backward carries
    for j, sg in enumerate(segs):
        if j > 0:
            smap = torch.full((E,), -1, dtype=torch.long)
            smap[sg["idx"]] = sg["val"]
            sg["bwd_gather"] = smap[segs[j - 1]["d_pos"]]
            assert (sg["bwd_gather"] >= 0).all(), "segment carry chain broken"
    for sg in segs:
        sg["val"] = sg["val"].to(torch.int32).to(dev)
        for name in ("idx", "piece_src", "bwd_gather"):
            if name in sg:
                sg[name] = sg[name].to(dev)
        sg["x_from"] = [(i, rows.to(dev)) for i, rows in sg["x_from"]]
    plan[key] = segs
    return segs


def _restore_carry(buf, S: int, sg, pieces) -> None:
    """Write ``X_j`` (rows ``S ..`` of ``buf``) from the checkpoint pieces of the earlier segments."""
    o = S
    for i, rows in sg["x_from"]:
        torch.index_select(pieces[i], 0, rows, out=buf[o: o + rows.numel()])
        o += rows.numel()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` (``[N, H, K]``) as the kernels read it: unit column stride, heads ``K`` apart, rows anywhere (a
    column slice of a wider projection is read in place); otherwise a contiguous copy."""
    return t if t.stride(2) == 1 and t.stride(1) == t.shape[2] else t.contiguous()


def _dag_forward(ctx, q, k, v, source, transition, mark, direct, schedule, recompute, strategy, chunk_bytes,
                 qs: float = 1.0):
    """The forward of :class:`_PLSTMDagTriton` (``q`` enters times ``qs``): returns ``(y, state)``, ``state`` the
    edge states kept for the backward (``None`` with ``recompute``); what the backward needs besides the saved
    tensors goes on ``ctx``."""
    n, H, K = q.shape
    V = v.shape[2]
    E = schedule.num_edges
    plan = _plan(schedule, strategy)
    y = torch.empty(n, H, V, dtype=v.dtype, device=v.device)
    per_edge = H * K * V * 4
    state = None
    if strategy == "graph" and recompute:
        chunks = _chunks(plan, E, per_edge, chunk_bytes or DEFAULT_CHUNK_BYTES)
        cap = max((int(plan["e_pptr_cpu"][g1] - plan["e_pptr_cpu"][g0]) for g0, g1 in chunks), default=0)
        buf = torch.empty(max(cap, 1), H, K, V, dtype=torch.float32, device=q.device)
        for g0, g1 in chunks:
            _run_fwd(q, k, v, source, transition, mark, direct, schedule, plan, strategy, y, buf,
                     nodes=True, g_range=(g0, g1), qs=qs)
        del buf
    elif recompute and E:  # levels strategy: segments; keep only each segment's checkpoint piece
        segs = _segments(schedule, plan, _segment_cap(schedule, plan, per_edge, chunk_bytes))
        slot_of = plan["slot_of"]
        pieces = []
        for sg in segs:
            S = sg["S"]
            slot_of[sg["idx"]] = sg["val"]
            buf = torch.empty(max(S + sg["x_pos"].numel(), 1), H, K, V, dtype=torch.float32, device=q.device)
            _restore_carry(buf, S, sg, pieces)
            _run_fwd(q, k, v, source, transition, mark, direct, schedule, plan, strategy, y, buf,
                     nodes=True, lvl_range=sg["levels"], slot_of=slot_of, qs=qs)
            pieces.append(buf[sg["piece_src"]] if "piece_src" in sg else None)
            del buf
        ctx.pieces = pieces
    else:
        state = torch.empty(max(E, 1), H, K, V, dtype=torch.float32, device=q.device)
        g_range = (0, plan["num_progs"]) if strategy == "graph" else None
        _run_fwd(q, k, v, source, transition, mark, direct, schedule, plan, strategy, y, state,
                 nodes=True, g_range=g_range, qs=qs)
        if recompute:
            state = None
    ctx.schedule, ctx.recompute, ctx.strategy, ctx.chunk_bytes = schedule, recompute, strategy, chunk_bytes
    return y, state


def _dag_backward(ctx, q, k, v, source, transition, mark, direct, state, dy, dq, dk, dv, qs: float = 1.0,
                  zero: Optional[torch.Tensor] = None):
    """The backward of :class:`_PLSTMDagTriton`: writes ``dq, dk, dv`` (float32, laid out as :func:`_rows`
    allows; every element is written) and returns float32 ``(dsrc [E, H], dtrans [L, H], dmark [E, H],
    ddirect [N, H])``, views of ``zero`` (a zeroed float32 ``[(2 E + L + N) H]``; allocated if ``None``)."""
    schedule, strategy = ctx.schedule, ctx.strategy
    dy = dy.contiguous()
    n, H, K = q.shape
    V = v.shape[2]
    E = schedule.num_edges
    plan = _plan(schedule, strategy)
    f32 = dict(dtype=torch.float32, device=q.device)
    # the direct term starts dq, dk, dv (one launch: _direct_bwd_kernel), the edge kernels accumulate on
    # top; the gate gradients start at zero (one allocation)
    L = schedule.num_line_edges
    if zero is None:
        zero = torch.zeros((2 * E + L + n) * H, **f32)
    dsrc, dtrans = zero[: E * H].view(E, H), zero[E * H: (E + L) * H].view(L, H)
    dmark, ddirect = zero[(E + L) * H: (2 * E + L) * H].view(E, H), zero[(2 * E + L) * H:].view(n, H)
    if n:
        bk, bv, _ = _blocks(K, V)
        rows = 16
        _kernel(_direct_bwd_kernel, ["R"])[((n * H + rows - 1) // rows,)](
            q, k, v, dy, direct, dq, dk, dv, ddirect, n * H, H, q.stride(0), k.stride(0), v.stride(0),
            dq.stride(0), dk.stride(0), dv.stride(0), float(qs), K=K, V=V, BK=bk, BV=bv, BR=rows)
    grads = (dq, dk, dv, dsrc, dtrans, dmark)
    if E:
        per_edge = H * K * V * 4
        if strategy == "graph" and ctx.recompute:
            chunks = _chunks(plan, E, per_edge, ctx.chunk_bytes or DEFAULT_CHUNK_BYTES)
            cap = max(int(plan["e_pptr_cpu"][g1] - plan["e_pptr_cpu"][g0]) for g0, g1 in chunks)
            buf = torch.empty(max(cap, 1), H, K, V, **f32)
            dbuf = torch.empty(max(cap, 1), H, K, V, **f32)
            for g0, g1 in reversed(chunks):
                _run_fwd(q, k, v, source, transition, mark, direct, schedule, plan, strategy, dy, buf,
                         nodes=False, g_range=(g0, g1), qs=qs)
                _run_bwd(q, k, v, source, transition, mark, dy, schedule, plan, strategy, buf, dbuf, grads,
                         g_range=(g0, g1), qs=qs)
        elif ctx.recompute:  # levels strategy, segment by segment from the last one
            segs = _segments(schedule, plan, _segment_cap(schedule, plan, per_edge, ctx.chunk_bytes))
            slot_of = plan["slot_of"]
            pieces = ctx.pieces
            if pieces is None:
                raise RuntimeError(
                    "plstm_dag(recompute=True) with the levels strategy frees its checkpoints in the "
                    "backward: run the forward again for a second backward"
                )
            ctx.pieces = None
            dcarry = None
            for j in range(len(segs) - 1, -1, -1):
                sg, S = segs[j], segs[j]["S"]
                pieces[j] = None  # read only by later segments, all done
                slot_of[sg["idx"]] = sg["val"]
                buf = torch.empty(max(S + sg["x_pos"].numel(), 1), H, K, V, **f32)
                _restore_carry(buf, S, sg, pieces)
                _run_fwd(q, k, v, source, transition, mark, direct, schedule, plan, strategy, dy, buf,
                         nodes=False, lvl_range=sg["levels"], slot_of=slot_of, qs=qs)
                nd = 0 if dcarry is None else dcarry.shape[0]
                dbuf = torch.empty(max(S + nd, 1), H, K, V, **f32)
                if nd:
                    dbuf[S: S + nd] = dcarry
                dcarry = None
                _run_bwd(q, k, v, source, transition, mark, dy, schedule, plan, strategy, buf, dbuf, grads,
                         lvl_range=sg["levels"], slot_of=slot_of, qs=qs)
                del buf
                if j > 0:
                    dcarry = dbuf[sg["bwd_gather"]]
                del dbuf
        else:
            g_range = (0, plan["num_progs"]) if strategy == "graph" else None
            if state is None:
                state = torch.empty(E, H, K, V, **f32)
                _run_fwd(q, k, v, source, transition, mark, direct, schedule, plan, strategy, dy, state,
                         nodes=False, g_range=g_range, qs=qs)
            dstate = torch.empty(E, H, K, V, **f32)
            _run_bwd(q, k, v, source, transition, mark, dy, schedule, plan, strategy, state, dstate, grads,
                     g_range=g_range, qs=qs)
    return dsrc, dtrans, dmark, ddirect


class _PLSTMDagTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, source, transition, mark, direct, schedule, recompute, strategy, chunk_bytes):
        q, k, v = _rows(q), _rows(k), _rows(v)  # views with unit head stride are read in place (no copy)
        source, transition, mark, direct = (t.contiguous() for t in (source, transition, mark, direct))
        y, state = _dag_forward(ctx, q, k, v, source, transition, mark, direct, schedule, recompute, strategy,
                                chunk_bytes)
        if state is None:
            ctx.save_for_backward(q, k, v, source, transition, mark, direct)
        else:
            ctx.save_for_backward(q, k, v, source, transition, mark, direct, state)
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, v, source, transition, mark, direct = ctx.saved_tensors[:7]
        state = ctx.saved_tensors[7] if len(ctx.saved_tensors) == 8 else None
        n, H, K = q.shape
        f32 = dict(dtype=torch.float32, device=q.device)
        dq, dk, dv = torch.empty(n, H, K, **f32), torch.empty(n, H, K, **f32), torch.empty(n, H, v.shape[2], **f32)
        dsrc, dtrans, dmark, ddirect = _dag_backward(ctx, q, k, v, source, transition, mark, direct, state, dy,
                                                     dq, dk, dv)
        out = (
            dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsrc.to(source.dtype), dtrans.to(transition.dtype),
            dmark.to(mark.dtype), ddirect.to(direct.dtype),
        )
        needs = ctx.needs_input_grad
        return tuple(g if needs[i] else None for i, g in enumerate(out)) + (None, None, None, None)


def plstm_dag_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    source: torch.Tensor,
    transition: torch.Tensor,
    mark: torch.Tensor,
    direct: torch.Tensor,
    schedule,
    recompute: bool = False,
    *,
    strategy: str = "auto",
    chunk_bytes: Optional[int] = None,
) -> torch.Tensor:
    """Triton pLSTM DAG operator; same contract as :func:`plstm_graph.plstm_dag` (SPEC section 2).

    Shapes:
        q, k ``[N, H, K]``; v ``[N, H, V]``; source, mark ``[E, H]``; transition ``[L, H]``; direct ``[N, H]``;
        returns ``y [N, H, V]`` in ``v``'s dtype. Inputs float32 / bfloat16 / float16 (each its own dtype);
        states and accumulation float32. ``K, V <= 128`` (any size, not only powers of two).

    Args:
        recompute: keep no states between forward and backward (see the module docstring for memory).
        strategy: ``"graph"`` (one launch per pass; one program walks one graph), ``"levels"`` (one launch
            per topological level) or ``"auto"`` (``graph`` when the largest graph has at most
            ``max(64, 4 * num_levels)`` edges).
        chunk_bytes: with ``recompute=True``: the state memory of one chunk of graphs (``graph``; default
            512 MiB), or of one level segment (``levels``; default: the segment size that minimises the
            estimated peak, see :func:`_segment_cap`).

    Example:
        >>> import os, torch; os.environ.setdefault("TRITON_INTERPRET", "1")  # doctest: +SKIP
        >>> from plstm_graph import compile_dag, plstm_dag
        >>> s = compile_dag(torch.tensor([[0, 1], [1, 2]]), num_nodes=3)
        >>> y = plstm_dag(*(torch.randn(3, 2, 4) for _ in range(3)), torch.rand(2, 2), torch.rand(1, 2),
        ...               torch.rand(2, 2), torch.rand(3, 2), s, backend="triton")  # doctest: +SKIP
    """
    if not _HAVE_TRITON:
        raise RuntimeError("backend='triton' needs the triton package (pip install 'plstm-graph[triton]')")
    if strategy == "auto":
        strategy = _choose_strategy(schedule)
    if strategy not in ("graph", "levels"):
        raise ValueError(f"strategy must be 'auto', 'graph' or 'levels', got {strategy!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"backend='triton' takes float32/bfloat16/float16 inputs; {name} is {t.dtype}")
    _blocks(q.shape[2], v.shape[2])
    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (set before importing triton)")
    return _PLSTMDagTriton.apply(
        q, k, v, source, transition, mark, direct, schedule, bool(recompute), strategy,
        int(chunk_bytes) if chunk_bytes is not None else 0,
    )
