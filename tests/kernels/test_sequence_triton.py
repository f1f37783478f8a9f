"""Triton recurrent-scan sequence kernels (``kernels/sequence.py``) against a readable token loop (SPEC
section 4) and against ``plstm_dag`` on the chain: outputs, final state and every input gradient, with the
Triton interpreter on CPU (or CUDA when present)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed (pip install 'plstm-graph[triton]')")

from plstm_graph import compile_dag, plstm_dag  # noqa: E402
from plstm_graph.kernels import sequence as kseq  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def loop_reference(q, k, v, s, t, m, d, h0=None, cu_seqlens=None):
    """C_t = t_t C_{t-1} + s_t k_t v_t^T;  y_t = m_t q_t^T C_{t-1} + d_t (q_t . k_t) v_t  (float64)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    bounds = [(b, 0, T) for b in range(B)] if cu_seqlens is None else [
        (0, a, e) for a, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())
    ]
    ys = torch.zeros(B, T, H, V, dtype=torch.float64)
    finals = []
    for i, (b, a, e) in enumerate(bounds):
        c = h0[i].clone() if h0 is not None else torch.zeros(H, K, V, dtype=torch.float64)
        for j in range(a, e):
            read = torch.einsum("hk,hkv->hv", q[b, j], c)
            ys[b, j] = m[b, j, :, None] * read + (d[b, j] * (q[b, j] * k[b, j]).sum(-1))[:, None] * v[b, j]
            c = t[b, j, :, None, None] * c + s[b, j, :, None, None] * k[b, j, :, :, None] * v[b, j, :, None, :]
        finals.append(c)
    return ys, torch.stack(finals)


def _inputs(B, T, H, K, V, n_seq, dtype=torch.float32, with_h0=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, K, generator=g),
          torch.randn(B, T, H, V, generator=g)]
    gates = [torch.randn(B, T, H, generator=g) for _ in range(4)]  # any sign
    gates[1][..., 0, :] = 0.0  # a zero transition
    h0 = torch.randn(n_seq, H, K, V, generator=g) if with_h0 else None
    return [x.to(dtype) for x in xs], gates, h0


def _check(B, T, H, K, V, chunk_size, cu=None, dtype=torch.float32, tol=1e-5, with_h0=True):
    n_seq = B if cu is None else len(cu) - 1
    xs, gates, h0 = _inputs(B, T, H, K, V, n_seq, dtype, with_h0)
    leaves = [t.to(DEVICE).requires_grad_() for t in xs + gates] + (
        [h0.to(DEVICE).requires_grad_()] if with_h0 else [])
    cu_t = None if cu is None else torch.tensor(cu, device=DEVICE)
    y, fin = kseq.plstm_sequence_triton(*leaves[:7], initial_state=leaves[7] if with_h0 else None,
                                        cu_seqlens=cu_t, chunk_size=chunk_size)
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
    y_ref, fin_ref = loop_reference(*ref_leaves[:7], h0=ref_leaves[7] if with_h0 else None,
                                    cu_seqlens=None if cu is None else torch.tensor(cu))
    gen = torch.Generator().manual_seed(9)
    dy, dfin = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64), torch.randn(
        fin_ref.shape, generator=gen, dtype=torch.float64)
    g = torch.autograd.grad((y * dy.to(DEVICE, y.dtype)).sum() + (fin * dfin.to(DEVICE)).sum(), leaves)
    g_ref = torch.autograd.grad((y_ref * dy).sum() + (fin_ref * dfin).sum(), ref_leaves)
    names = ["y", "final", "dq", "dk", "dv", "dsource", "dtransition", "dmark", "ddirect", "dinitial"]
    assert y.dtype == xs[2].dtype and fin.dtype == torch.float32
    for name, a, b in zip(names, (y, fin) + g, (y_ref, fin_ref) + g_ref):
        scale = b.abs().max().item() + 1e-6
        err = (a.detach().cpu().double() - b).abs().max().item()
        assert err <= tol * scale, f"{name}: max error {err:.3g} vs scale {scale:.3g}"


def test_batch_rows_chunks_not_dividing_T():
    # T=7 with checkpoints every 3 tokens; K, V not powers of two
    _check(B=2, T=7, H=2, K=3, V=5, chunk_size=3)


def test_packed_sequences_with_empty_and_single_token():
    # cu_seqlens packs sequences of lengths 4, 0, 1, 5 along T (B = 1)
    _check(B=1, T=10, H=1, K=4, V=4, chunk_size=2, cu=[0, 4, 4, 5, 10])


def test_v_blocks_and_no_initial_state():
    # V = 40 > BV at K = 256 // ... : force several V-blocks with a large K
    K, V = 128, 40
    bk, bv, _ = kseq._blocks(K, V)
    assert bv < V  # more than one V-block (sums over blocks through atomics)
    _check(B=1, T=3, H=1, K=K, V=V, chunk_size=64, with_h0=False, tol=1e-4)


def test_bf16_inputs():
    _check(B=1, T=5, H=1, K=4, V=4, chunk_size=2, dtype=torch.bfloat16, tol=3e-2)


def test_equals_dag_operator_on_the_chain():
    # SPEC section 4: the sequence operator is plstm_dag on the chain 0 -> 1 -> ... -> T-1
    T, H, K, V = 6, 1, 3, 2
    xs, gates, _ = _inputs(1, T, H, K, V, 1, with_h0=False, seed=4)
    q, k, v = (x[0] for x in xs)
    s, t, m, d = (g_[0] for g_ in gates)
    sched = compile_dag(torch.stack([torch.arange(T - 1), torch.arange(1, T)]), num_nodes=T)
    # edge e_j = (j -> j+1): source s_j, line edge (e_{j-1}, e_j): transition t_j, mark[e_{j-1}] = m_j
    y_dag = plstm_dag(q, k, v, s[:-1], t[1:T - 1], m[1:], d, sched, backend="reference")
    y, _ = kseq.plstm_sequence_triton(*(x.to(DEVICE) for x in xs), *(g_.to(DEVICE) for g_ in gates))
    torch.testing.assert_close(y[0].cpu(), y_dag, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_state", [True, False])
def test_decoding_step_matches_the_recurrence(with_state):
    g = torch.Generator().manual_seed(5)
    B, H, K, V = 3, 2, 5, 6
    q, k, v = torch.randn(B, H, K, generator=g), torch.randn(B, H, K, generator=g), torch.randn(B, H, V, generator=g)
    s, t, m, d = (torch.randn(B, H, generator=g) for _ in range(4))
    c = torch.randn(B, H, K, V, generator=g) if with_state else torch.zeros(B, H, K, V)
    y_ref = m[..., None] * torch.einsum("bhk,bhkv->bhv", q, c) + (d * (q * k).sum(-1))[..., None] * v
    c_ref = t[..., None, None] * c + s[..., None, None] * k[..., :, None] * v[..., None, :]
    dev = [x.to(DEVICE) for x in (q, k, v, s, t, m, d)]
    state = c.to(DEVICE) if with_state else None
    y, new = kseq.plstm_sequence_step_triton(*dev, state, out_state=state)  # in place when a state is given
    torch.testing.assert_close(y.cpu(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new.cpu(), c_ref, rtol=1e-5, atol=1e-5)


def test_plstm_sequence_step_backend_choice(monkeypatch):
    from plstm_graph.ops.sequence import plstm_sequence_step

    g = torch.Generator().manual_seed(6)
    B, H, K, V = 2, 3, 8, 4
    q, k = torch.randn(B, H, K, generator=g), torch.randn(B, H, K, generator=g)
    v = torch.randn(B, H, V, generator=g).to(torch.bfloat16)
    gates = [torch.rand(B, H, generator=g) for _ in range(4)]
    state = torch.randn(B, H, K, V, generator=g)
    dev = [x.to(DEVICE) for x in (q, k, v, *gates)]
    y_t, s_t = plstm_sequence_step(*dev, state.to(DEVICE), backend="triton")
    y_r, s_r = plstm_sequence_step(*dev, state.to(DEVICE), backend="torch")
    assert y_t.dtype == y_r.dtype == torch.bfloat16 and s_t.dtype == s_r.dtype == torch.float32
    torch.testing.assert_close(y_t.float(), y_r.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(s_t, s_r, rtol=1e-5, atol=1e-5)
    # "auto": the fused step only on CUDA without autograd; CPU tensors and gradients keep the torch step
    calls = []
    real = kseq.plstm_sequence_step_triton
    monkeypatch.setattr(kseq, "plstm_sequence_step_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    plstm_sequence_step(*dev, state.to(DEVICE))
    assert len(calls) == (1 if DEVICE == "cuda" else 0)
    qg = dev[0].clone().requires_grad_()
    y, _ = plstm_sequence_step(qg, *dev[1:], state.to(DEVICE))
    assert y.requires_grad and len(calls) == (1 if DEVICE == "cuda" else 0)
    with pytest.raises(ValueError, match="backend"):
        plstm_sequence_step(*dev, None, backend="fast")
