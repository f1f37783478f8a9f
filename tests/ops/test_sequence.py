"""plstm_sequence / retention: the three modes against the step-by-step reference, the chain DAG, and
RetNet's closed form. Gates include negative and exactly-zero transitions throughout."""
from __future__ import annotations

import pytest
import torch

import plstm_graph
from plstm_graph import compile_dag, plstm_dag, plstm_sequence, retention
from plstm_graph.ops.sequence import plstm_sequence_reference, plstm_sequence_step, retention_gammas
from plstm_graph.ops.sequence.chunkwise import chunk_scan
from plstm_graph.ops.sequence.products import segment_products

MODES = ["chunkwise", "parallel", "recurrent"]
F64 = torch.float64


def make_inputs(B, T, H, K, V, dtype=F64, seed=0, zeros=True, init=True, num_seqs=None):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    q, k, v = rnd(B, T, H, K), rnd(B, T, H, K), rnd(B, T, H, V)
    source, mark, direct = rnd(B, T, H), rnd(B, T, H), rnd(B, T, H)
    transition = torch.rand(B, T, H, generator=g, dtype=F64) * 2.2 - 1.1  # negative, and |t| > 1 sometimes
    if zeros:
        transition[torch.rand(B, T, H, generator=g) < 0.1] = 0.0
    n = B if num_seqs is None else num_seqs
    state = rnd(n, H, K, V) if init else None
    out = [q, k, v, source, transition, mark, direct, state]
    return [None if x is None else x.to(dtype) for x in out]


def run(mode, inputs, **kw):
    q, k, v, s, t, m, d, c0 = inputs
    if mode == "reference":
        return plstm_sequence_reference(q, k, v, s, t, m, d, c0, kw.get("cu_seqlens"))
    return plstm_sequence(q, k, v, s, t, m, d, initial_state=c0, output_final_state=True, mode=mode, **kw)


def outputs_and_grads(mode, inputs, seed=1, **kw):
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
    y, final = run(mode, leaves, **kw)
    g = torch.Generator().manual_seed(seed)
    wy = torch.randn(y.shape, generator=g, dtype=F64).to(y.dtype)
    wf = torch.randn(final.shape, generator=g, dtype=F64).to(final.dtype)
    ((y * wy).sum() + (final * wf).sum()).backward()
    # an input that cannot reach the loss (e.g. q when T = 0) has gradient zero, whether or not autograd saw it
    grads = [None if x is None else (x.grad if x.grad is not None else torch.zeros_like(x)) for x in leaves]
    return y.detach(), final.detach(), grads


def assert_close_all(a, b, atol, rtol, what=""):
    ya, fa, ga = a
    yb, fb, gb = b
    torch.testing.assert_close(ya.to(F64), yb.to(F64), atol=atol, rtol=rtol, msg=f"{what} output")
    torch.testing.assert_close(fa.to(F64), fb.to(F64), atol=atol, rtol=rtol, msg=f"{what} final state")
    names = ["q", "k", "v", "source", "transition", "mark", "direct", "initial_state"]
    for name, x, y in zip(names, ga, gb):
        if x is None:
            assert y is None
            continue
        torch.testing.assert_close(x.to(F64), y.to(F64), atol=atol, rtol=rtol, msg=f"{what} grad {name}")


# --------------------------------------------------------------------------------------- building blocks
def test_segment_products_matches_loop_and_gradcheck():
    x = torch.randn(2, 9, dtype=F64)
    x[0, 3] = 0.0
    x[1, 2] = x[1, 6] = 0.0
    expect = torch.zeros(2, 9, 9, dtype=F64)
    for i in range(9):
        for j in range(i + 1):
            expect[:, i, j] = torch.prod(x[:, j + 1 : i + 1], -1)
    torch.testing.assert_close(segment_products(x), expect)
    assert torch.autograd.gradcheck(segment_products, (x.requires_grad_(),))


@pytest.mark.parametrize("n", [1, 5, 64, 65, 300])
def test_chunk_scan_matches_loop(n):
    g = torch.Generator().manual_seed(n)
    decay = torch.randn(3, n, generator=g, dtype=F64)
    decay[:, ::7] = 0.0
    entries = torch.randn(3, n, 4, generator=g, dtype=F64)
    state, rows = torch.zeros(3, 4, dtype=F64), []
    for i in range(n):
        state = decay[:, i, None] * state + entries[:, i]
        rows.append(state)
    torch.testing.assert_close(chunk_scan(decay, entries, block=8), torch.stack(rows, 1))


def test_chunk_scan_gradcheck_recursive():
    decay = torch.randn(2, 11, dtype=F64)
    decay[0, 4] = 0.0
    entries = torch.randn(2, 11, 3, dtype=F64)
    fn = lambda d, e: chunk_scan(d, e, block=3)  # noqa: E731  (two levels of recursion)
    assert torch.autograd.gradcheck(fn, (decay.requires_grad_(), entries.requires_grad_()), fast_mode=True)


# --------------------------------------------------------------------------------------- the three modes
@pytest.mark.parametrize("T", [1, 15, 63, 300])
def test_modes_match_reference_outputs_states_and_grads(T):
    inputs = make_inputs(2, T, 2, 9, 5, seed=T)
    ref = outputs_and_grads("reference", inputs)
    for mode in MODES:
        chunk_sizes = [16, 5] if mode == "chunkwise" else [64]  # 300 / 5 = 60 chunks; 300 / 16 pads
        for cs in chunk_sizes:
            got = outputs_and_grads(mode, inputs, chunk_size=cs)
            assert_close_all(got, ref, atol=1e-9, rtol=1e-9, what=f"{mode} T={T} chunk={cs}")


def test_odd_head_dims_k100_without_initial_state():
    inputs = make_inputs(1, 37, 3, 101, 33, seed=7, init=False)
    ref = outputs_and_grads("reference", inputs)
    for mode in MODES:
        assert_close_all(outputs_and_grads(mode, inputs, chunk_size=8), ref, 1e-9, 1e-9, what=mode)


def test_chunkwise_scan_recursion_long():
    # 700 steps in chunks of 4 = 175 chunks: the cross-chunk scan recurses on the ends of 32-chunk blocks
    inputs = make_inputs(1, 700, 1, 3, 2, seed=3)
    q, k, v, s, t, m, d, c0 = inputs
    t = t.clamp(-1, 1)
    inputs = [q, k, v, s, t, m, d, c0]
    ref = outputs_and_grads("reference", inputs)
    assert_close_all(outputs_and_grads("chunkwise", inputs, chunk_size=4), ref, 1e-9, 1e-8, what="chunkwise")


def test_all_zero_and_negative_transitions():
    for fill in (0.0, -1.0):
        inputs = make_inputs(2, 20, 2, 4, 3, seed=5)
        inputs[4] = torch.full_like(inputs[4], fill)
        ref = outputs_and_grads("reference", inputs)
        for mode in MODES:
            got = outputs_and_grads(mode, inputs, chunk_size=6)
            assert_close_all(got, ref, 1e-10, 1e-10, what=f"{mode} transition={fill}")


def test_gradcheck_chunkwise_float64():
    q, k, v, s, t, m, d, c0 = make_inputs(1, 8, 2, 2, 2, seed=11)
    t[0, 2, 0] = 0.0
    t[0, 6, 1] = -0.5

    def fn(*xs):
        y, f = plstm_sequence(*xs[:7], initial_state=xs[7], output_final_state=True, chunk_size=4)
        return y, f

    args = tuple(x.requires_grad_() for x in (q, k, v, s, t, m, d, c0))
    assert torch.autograd.gradcheck(fn, args, fast_mode=True)


def test_bf16_inputs_float32_states():
    inputs = make_inputs(2, 130, 2, 32, 16, seed=2, zeros=True)
    inputs[4] = inputs[4].clamp(-1, 1)
    low = [x.to(torch.bfloat16) for x in inputs]
    ref_y, ref_f = plstm_sequence_reference(*[x.to(F64) for x in low[:7]], low[7].to(F64))
    scale = ref_y.abs().max().item()
    for mode in MODES:
        leaves = [x.detach().clone().requires_grad_() for x in low]
        y, f = run(mode, leaves, chunk_size=32)
        assert y.dtype == torch.bfloat16 and f.dtype == torch.float32
        err = (y.to(F64) - ref_y).abs().max().item()
        assert err < 0.03 * scale, (mode, err, scale)
        assert (f.to(F64) - ref_f).abs().max().item() < 0.02 * ref_f.abs().max().item()
        (y.float().sum() + f.sum()).backward()
        assert all(x.grad is not None and x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all() for x in leaves)


# --------------------------------------------------------------------------------------- packing
def test_cu_seqlens_equals_separate_sequences():
    lens = [5, 0, 17, 1, 40]
    T = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    inputs = make_inputs(1, T, 2, 6, 3, seed=4, num_seqs=len(lens))
    for mode in MODES:
        packed = outputs_and_grads(mode, inputs, cu_seqlens=cu, chunk_size=8)
        ys, fs = [], []
        for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            part = [x[:, a:b] for x in inputs[:7]] + [inputs[7][n : n + 1]]
            yo, fo = run("reference", part)
            ys.append(yo)
            fs.append(fo)
        # gradients: against the reference run on the same packed input (same random loss weights)
        torch.testing.assert_close(packed[0], torch.cat(ys, 1))
        torch.testing.assert_close(packed[1], torch.cat(fs))
        ref_packed = outputs_and_grads("reference", inputs, cu_seqlens=cu)
        assert_close_all(packed, ref_packed, 1e-9, 1e-9, what=f"{mode} packed")


def test_cu_seqlens_errors():
    q, k, v, s, t, m, d, _ = make_inputs(2, 6, 1, 2, 2, init=False)
    with pytest.raises(ValueError, match="B must be 1"):
        plstm_sequence(q, k, v, s, t, m, d, cu_seqlens=torch.tensor([0, 6]))
    q, k, v, s, t, m, d, _ = make_inputs(1, 6, 1, 2, 2, init=False)
    with pytest.raises(ValueError, match="cu_seqlens"):
        plstm_sequence(q, k, v, s, t, m, d, cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="initial_state"):
        plstm_sequence(q, k, v, s, t, m, d, initial_state=torch.zeros(1, 1, 2, 2), cu_seqlens=torch.tensor([0, 2, 6]))


def test_input_errors():
    q, k, v, s, t, m, d, _ = make_inputs(1, 6, 2, 3, 2, init=False)
    with pytest.raises(ValueError, match="mode"):
        plstm_sequence(q, k, v, s, t, m, d, mode="fast")
    with pytest.raises(ValueError, match="backend"):
        plstm_sequence(q, k, v, s, t, m, d, backend="cuda")
    with pytest.raises(ValueError, match="transition"):
        plstm_sequence(q, k, v, s, t[:, :, :1], m, d)
    with pytest.raises(ValueError, match=r"\[B, T, H, K\]"):
        plstm_sequence(q[0], k, v, s, t, m, d)
    if "triton" not in plstm_graph.ops.sequence.sequence_backends():
        with pytest.raises(RuntimeError, match="triton"):
            plstm_sequence(q, k, v, s, t, m, d, backend="triton")


# --------------------------------------------------------------------------------------- chain DAG
@pytest.mark.parametrize("T", [1, 2, 15])
@pytest.mark.parametrize("dag_backend", ["reference", "levels"])
def test_equals_plstm_dag_on_chain(T, dag_backend):
    q, k, v, s, t, m, d, _ = make_inputs(1, T, 2, 4, 3, seed=T, init=False)
    y_seq, _ = plstm_sequence(q, k, v, s, t, m, d, mode="chunkwise", chunk_size=4)
    edge_index = torch.stack([torch.arange(T - 1), torch.arange(1, T)])  # e_t = (t -> t+1), column t
    sched = compile_dag(edge_index, num_nodes=T)
    tails, heads = sched.edge_index
    a, b = sched.line_index
    y_dag = plstm_dag(
        q[0], k[0], v[0],
        source=s[0, tails],  # source[e_t] = source_t
        transition=t[0, tails[b]],  # transition[(e_{t-1}, e_t)] = transition_t
        mark=m[0, heads],  # mark[e_{t-1}] = mark_t
        direct=d[0],
        schedule=sched,
        backend=dag_backend,
    )
    torch.testing.assert_close(y_seq[0], y_dag)


# --------------------------------------------------------------------------------------- retention
@pytest.mark.parametrize("mode", MODES)
def test_retention_closed_form(mode):
    B, T, H, K, V = 2, 45, 3, 10, 6
    q, k, v = (torch.randn(B, T, H, n, dtype=F64) for n in (K, K, V))
    s0 = torch.randn(B, H, K, V, dtype=F64)
    o, final = retention(q, k, v, initial_state=s0, output_final_state=True, mode=mode, chunk_size=16)
    gamma = torch.tensor([1 - 2.0 ** (-5 - h) for h in range(H)], dtype=F64)
    tt = torch.arange(T, dtype=F64)
    dist = tt[:, None] - tt[None, :]
    decay = torch.where(dist >= 0, gamma[:, None, None] ** dist.clamp(min=0), torch.zeros((), dtype=F64))  # [H, T, S]
    scores = torch.einsum("bthk,bshk->bhts", q, k) * K ** -0.5 * decay
    expect = torch.einsum("bhts,bshv->bthv", scores, v)
    expect = expect + torch.einsum("bthk,bhkv->bthv", q * K ** -0.5, s0) * (gamma[None, None, :] ** (tt[:, None] + 1))[..., None]
    torch.testing.assert_close(o, expect)
    weights = gamma[:, None] ** (T - 1 - tt)  # [H, S]
    expect_final = torch.einsum("hs,bshk,bshv->bhkv", weights, k, v) + gamma[None, :, None, None] ** T * s0
    torch.testing.assert_close(final, expect_final)


def test_retention_defaults_and_custom_gamma():
    torch.testing.assert_close(retention_gammas(3, dtype=F64), torch.tensor([1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128], dtype=F64))
    q, k, v = (torch.randn(1, 9, 2, 4, dtype=F64) for _ in range(3))
    o1, _ = retention(q, k, v, gamma=torch.tensor([0.5, -0.25], dtype=F64), scale=1.0, mode="parallel")
    one = torch.ones(1, 9, 2, dtype=F64)
    gam = torch.tensor([0.5, -0.25], dtype=F64).expand(1, 9, 2)
    o2, _ = plstm_sequence_reference(q, k, v, one, gam, gam, one)
    torch.testing.assert_close(o1, o2)
    with pytest.raises(ValueError, match="gamma"):
        retention(q, k, v, gamma=torch.ones(3))


def test_retention_long_sequence_chunkwise():
    # T = 32k: chunkwise never builds a T x T matrix (that alone would be 4 GiB here)
    B, T, H, K, V = 1, 32768, 2, 4, 4
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, n, generator=g) for n in (K, K, V))
    o, final = retention(q, k, v, output_final_state=True, chunk_size=64)
    o2, final2 = retention(q, k, v, output_final_state=True, chunk_size=48)
    torch.testing.assert_close(o, o2, atol=1e-4, rtol=1e-4)
    gamma = retention_gammas(H, dtype=F64)
    weights = gamma[:, None] ** (T - 1 - torch.arange(T, dtype=F64))
    expect_final = torch.einsum("hs,bshk,bshv->bhkv", weights, k.double(), v.double())
    torch.testing.assert_close(final.double(), expect_final, atol=1e-4, rtol=1e-4)
    # the last output against its closed form
    expect_last = torch.einsum("hs,shk,hk,shv->hv", weights, k[0].double(), q[0, -1].double() * K ** -0.5, v[0].double())
    torch.testing.assert_close(o[0, -1].double(), expect_last, atol=1e-4, rtol=1e-4)


def test_step_decoding_matches_chunkwise():
    q, k, v, s, t, m, d, c0 = make_inputs(2, 12, 2, 5, 4, seed=9)
    y, final = plstm_sequence(q, k, v, s, t, m, d, initial_state=c0, output_final_state=True)
    state, ys = c0, []
    for i in range(12):
        yi, state = plstm_sequence_step(q[:, i], k[:, i], v[:, i], s[:, i], t[:, i], m[:, i], d[:, i], state)
        ys.append(yi)
    torch.testing.assert_close(torch.stack(ys, 1), y)
    torch.testing.assert_close(state, final)


@pytest.mark.parametrize("T", [32, 40])  # 32: gates shared over batch/time take the once-per-head path
def test_retention_grads_match_across_modes(T):
    g = torch.Generator().manual_seed(T)
    B, H, K, V = 2, 3, 6, 5
    base = [torch.randn(B, T, H, n, generator=g, dtype=F64) for n in (K, K, V)]
    base += [torch.tensor([0.9, -0.7, 0.0], dtype=F64), torch.randn(B, H, K, V, generator=g, dtype=F64)]
    w = torch.randn(B, T, H, V, generator=g, dtype=F64)
    results = []
    for mode in MODES:
        leaves = [x.clone().requires_grad_() for x in base]
        q, k, v, gamma, s0 = leaves
        o, f = retention(q, k, v, gamma=gamma, initial_state=s0, output_final_state=True, mode=mode, chunk_size=8)
        ((o * w).sum() + f.square().sum()).backward()
        results.append([o.detach(), f.detach()] + [x.grad for x in leaves])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------- random sizes
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=15, deadline=None)
@given(
    lens=st.lists(st.integers(0, 23), min_size=1, max_size=4),
    chunk=st.integers(1, 9),
    heads=st.integers(1, 2),
    dk=st.integers(1, 5),
    dv=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
def test_random_packed_sizes_match_reference(lens, chunk, heads, dk, dv, seed):
    T = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    inputs = make_inputs(1, T, heads, dk, dv, seed=seed, num_seqs=len(lens))
    ref = outputs_and_grads("reference", inputs, cu_seqlens=cu)
    got = outputs_and_grads("chunkwise", inputs, cu_seqlens=cu, chunk_size=chunk)
    assert_close_all(got, ref, 1e-9, 1e-9, what=f"lens={lens} chunk={chunk}")
    if len(lens) == 1:  # the same sequence unpacked
        got = outputs_and_grads("chunkwise", inputs, chunk_size=chunk)
        assert_close_all(got, ref, 1e-9, 1e-9, what=f"unpacked T={T} chunk={chunk}")
