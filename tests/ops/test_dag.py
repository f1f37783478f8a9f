"""plstm_dag: every backend against the per-edge reference, outputs and all gradients (SPEC section 2)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from plstm_graph import compile_dag, dag_backends, plstm_dag
from plstm_graph.ops.dag import paths as dag_paths
from plstm_graph.ops.dag.parallel import gating_matrices
from plstm_graph.ops.dag.paths import count_paths, path_tables

from ..conftest import hostile_dags, random_dag

# float64 PyTorch backends; the Triton kernels (float32 states, no float64) are checked against the reference
# in tests/kernels/test_dag_triton.py
FAST = [b for b in dag_backends() if b not in ("reference", "triton")]


def make_inputs(s, heads=3, dk=4, dv=5, dtype=torch.float64, seed=0, gate_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    n, e, l = s.num_nodes, s.num_edges, s.num_line_edges

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    return [
        r(n, heads, dk), r(n, heads, dk), r(n, heads, dv),
        r(e, heads) * gate_scale, r(l, heads) * 0.6 * gate_scale, r(e, heads) * gate_scale, r(n, heads),
    ]


def run(backend, inputs, s, weights=None, **kw):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    y = plstm_dag(*inputs, s, backend=backend, **kw)
    if weights is None:
        weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grads = torch.autograd.grad((y.double() * weights).sum(), inputs, allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(inputs, grads)]
    return y, grads


def assert_close_all(a, b, atol=1e-10, rtol=1e-8):
    names = ["y", "dq", "dk", "dv", "dsource", "dtransition", "dmark", "ddirect"]
    ya, ga = a
    yb, gb = b
    for name, x, y in zip(names, [ya] + list(ga), [yb] + list(gb)):
        torch.testing.assert_close(x.double(), y.double(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("mode", ["P", "D"])
@pytest.mark.parametrize("case", hostile_dags(), ids=lambda c: c[0])
def test_backend_matches_reference(backend, mode, case):
    _, ei, n = case
    s = compile_dag(ei, n, mode)
    x = make_inputs(s)
    assert_close_all(run(backend, x, s), run("reference", x, s))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 16), p=st.floats(0.0, 0.6), seed=st.integers(0, 10_000), mode=st.sampled_from("PD"),
       heads=st.integers(1, 3), dk=st.integers(1, 6), dv=st.integers(1, 6))
def test_random_dags_property(n, p, seed, mode, heads, dk, dv):
    s = compile_dag(random_dag(n, p, seed), n, mode)
    x = make_inputs(s, heads, dk, dv, seed=seed)
    ref = run("reference", x, s)
    for backend in FAST:
        assert_close_all(run(backend, x, s), ref)


@pytest.mark.parametrize("backend", ["levels", "parallel", "paths"])
def test_gradcheck_float64(backend):
    s = compile_dag(torch.tensor([[0, 0, 1, 2, 3, 3, 4, 5], [1, 2, 3, 3, 4, 5, 6, 6]]), 7, "P")
    x = [t.requires_grad_() for t in make_inputs(s, heads=2, dk=3, dv=2)]
    assert torch.autograd.gradcheck(lambda *a: plstm_dag(*a, s, backend=backend), x)


def test_recompute_gives_same_gradients():
    s = compile_dag(random_dag(15, 0.3, 2), 15, "P")
    x = make_inputs(s)
    assert_close_all(run("levels", x, s, recompute=True), run("levels", x, s), atol=1e-12)


def test_hostile_gates_are_exact():
    # large, negative and zero gates: no normalisation inside the operator
    s = compile_dag(random_dag(12, 0.4, 9), 12, "P")
    x = make_inputs(s, gate_scale=3.0)
    x[4][::2] = 0.0
    ref = run("reference", x, s)
    for backend in FAST:
        assert_close_all(run(backend, x, s), ref, atol=1e-8, rtol=1e-8)


def test_chain_with_retnet_gates_is_retention():
    t, heads, dk, dv, gamma = 23, 2, 4, 3, 0.9
    ei = torch.stack([torch.arange(t - 1), torch.arange(1, t)])
    s = compile_dag(ei, t, "P")
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(t, heads, d, generator=g, dtype=torch.float64) for d in (dk, dk, dv))
    ones_e = torch.ones(t - 1, heads, dtype=torch.float64)
    y = plstm_dag(q, k, v, ones_e, gamma * torch.ones(t - 2, heads, dtype=torch.float64), gamma * ones_e,
                  torch.ones(t, heads, dtype=torch.float64), s)
    pos = torch.arange(t, dtype=torch.float64)
    decay = torch.where(pos[:, None] >= pos[None, :], gamma ** (pos[:, None] - pos[None, :]), torch.zeros(()))
    o = torch.einsum("ts,thk,shk,shv->thv", decay, q, k, v)
    torch.testing.assert_close(y, o)


@pytest.mark.parametrize("backend", FAST + ["reference"])
def test_batched_equals_per_graph(backend):
    cases = hostile_dags()
    eis, off = [], 0
    for _, ei, n in cases:
        eis.append(ei + off)
        off += n
    union = compile_dag(torch.cat(eis, 1), off, "D")
    x = make_inputs(union, seed=3)
    y = plstm_dag(*x, union, backend=backend)
    node_off = edge_off = 0
    for _, ei, n in cases:
        s = compile_dag(ei, n, "D")
        # slice this graph's inputs out of the union (line edges are matched by (a, b) pairs)
        pairs = {tuple(p): i for i, p in enumerate(union.line_index.T.tolist())}
        lid = torch.tensor([pairs[(a + edge_off, b + edge_off)] for a, b in s.line_index.T.tolist()],
                           dtype=torch.long)
        e = s.num_edges
        xi = [x[0][node_off:node_off + n], x[1][node_off:node_off + n], x[2][node_off:node_off + n],
              x[3][edge_off:edge_off + e], x[4][lid], x[5][edge_off:edge_off + e], x[6][node_off:node_off + n]]
        torch.testing.assert_close(plstm_dag(*xi, s, backend=backend), y[node_off:node_off + n])
        node_off += n
        edge_off += e


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(backend, dtype):
    s = compile_dag(random_dag(20, 0.25, 4), 20, "P")
    x32 = make_inputs(s, dtype=torch.float32, gate_scale=0.5)
    xh = [t.to(dtype) for t in x32]
    y = plstm_dag(*xh, s, backend=backend)
    assert y.dtype == dtype
    ref = plstm_dag(*[t.float() for t in xh], s, backend="reference")
    torch.testing.assert_close(y.float(), ref, atol=3e-2, rtol=3e-2)
    xh = [t.requires_grad_() for t in xh]
    plstm_dag(*xh, s, backend=backend).float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == dtype and torch.isfinite(t.grad.float()).all() for t in xh)


def test_runs_under_autocast():
    s = compile_dag(random_dag(10, 0.3, 4), 10, "P")
    x = make_inputs(s, dtype=torch.float32)
    ref = plstm_dag(*x, s)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = plstm_dag(*x, s)
    torch.testing.assert_close(y, ref)  # states stay float32 inside


def test_gating_matrix_is_path_sum():
    # diamond 0 -> {1, 2} -> 3: G[3, 0] sums the two paths
    s = compile_dag(torch.tensor([[0, 0, 1, 2], [1, 2, 3, 3]]), 4, "P")
    src = torch.tensor([[2.0], [3.0], [5.0], [7.0]])
    tr = torch.tensor([[0.5], [0.25]])  # line edges (0, 2) and (1, 3)
    mk = torch.tensor([[11.0], [13.0], [17.0], [19.0]])
    g = gating_matrices(src, tr, mk, s)[0, 0]
    assert g[3, 0].item() == pytest.approx(2 * 0.5 * 17 + 3 * 0.25 * 19)
    assert g[1, 0].item() == pytest.approx(2 * 11) and g[3, 1].item() == pytest.approx(5 * 17)
    assert g[0, 3].item() == 0.0


def _diamond_chain(k):
    """``k`` diamonds in a row: node 3i -> {3i+1, 3i+2} -> 3i+3; 2**k paths from the first node to the last."""
    ei = []
    for i in range(k):
        a = 3 * i
        ei += [(a, a + 1), (a, a + 2), (a + 1, a + 3), (a + 2, a + 3)]
    return torch.tensor(ei).T, 3 * k + 1


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 14), p=st.floats(0.0, 0.7), seed=st.integers(0, 10_000), mode=st.sampled_from("PD"))
def test_path_count_matches_enumeration(n, p, seed, mode):
    s = compile_dag(random_dag(n, p, seed), n, mode)
    tables = path_tables(s)
    assert count_paths(s) == tables["factors"].shape[0]
    # brute force: every path, by depth-first search over the line graph
    out = {}
    for a, b in s.line_index.T.tolist():
        out.setdefault(a, []).append(b)

    def walk(e):
        return 1 + sum(walk(b) for b in out.get(e, []))
    assert count_paths(s) == sum(walk(e) for e in range(s.num_edges))
    # every row ends with a mark, and only the constant 1 pads it
    one = 2 * s.num_edges + s.num_line_edges
    for row in tables["factors"].tolist():
        body = [i for i in row if i != one]
        assert body[0] < s.num_edges and s.num_edges + s.num_line_edges <= body[-1] < one
        assert row[len(body):] == [one] * (len(row) - len(body))


def test_path_weights_of_a_diamond():
    # 0 -> {1, 2} -> 3, P-mode: y_3 reads node 0 through two paths, each source * transition * mark
    s = compile_dag(torch.tensor([[0, 0, 1, 2], [1, 2, 3, 3]]), 4, "P")
    src = torch.tensor([[2.0], [3.0], [5.0], [7.0]], dtype=torch.float64)
    tr = torch.tensor([[0.5], [0.25]], dtype=torch.float64)  # line edges (0, 2) and (1, 3)
    mk = torch.tensor([[11.0], [13.0], [17.0], [19.0]], dtype=torch.float64)
    q = k = torch.zeros(4, 1, 1, dtype=torch.float64)
    q[3], k[0] = 1.0, 1.0  # only the pair (3, 0) scores
    v = torch.arange(1.0, 5.0, dtype=torch.float64).view(4, 1, 1)
    y = plstm_dag(q, k, v, src, tr, mk, torch.zeros(4, 1, dtype=torch.float64), s, backend="paths")
    assert y[3].item() == pytest.approx((2 * 0.5 * 17 + 3 * 0.25 * 19) * 1.0)
    assert y[:3].abs().sum().item() == 0.0


def test_auto_takes_paths_only_under_the_budget(monkeypatch):
    from plstm_graph.ops import dag as dag_ops

    few = compile_dag(random_dag(12, 0.3, 1), 12, "P")
    many = compile_dag(*_diamond_chain(12), "P")  # 2**12 paths from end to end alone
    assert dag_ops._auto_backend(torch.zeros(1), few) == "paths"
    assert count_paths(many) > dag_ops.AUTO_PATHS_PER_EDGE * many.num_edges + 4096
    assert dag_ops._auto_backend(torch.zeros(1), many) == "parallel"
    assert "paths" not in many.cache  # over the budget: counted, never enumerated
    x = make_inputs(many, heads=1, dk=2, dv=2)
    assert_close_all(run("auto", x, many), run("levels", x, many))
    # an explicit backend="paths" enumerates up to MAX_PATHS, then says what to use instead
    monkeypatch.setattr(dag_paths, "MAX_PATHS", 1000)
    with pytest.raises(ValueError, match="backend='levels'"):
        plstm_dag(*x, many, backend="paths")


def test_paths_on_a_dag_without_edges():
    s = compile_dag(torch.zeros(2, 0, dtype=torch.long), 3, "P")
    x = make_inputs(s)
    assert_close_all(run("paths", x, s), run("reference", x, s))


def test_bad_inputs_are_clear_errors():
    s = compile_dag(torch.tensor([[0, 1], [1, 2]]), 3)
    x = make_inputs(s)
    with pytest.raises(ValueError, match=r"transition has shape \[2, 3\], expected \[1, 3\]"):
        plstm_dag(x[0], x[1], x[2], x[3], torch.zeros(2, 3, dtype=torch.float64), x[5], x[6], s)
    with pytest.raises(ValueError, match="unknown backend"):
        plstm_dag(*x, s, backend="cuda-magic")
    with pytest.raises(TypeError, match="DAGSchedule"):
        plstm_dag(*x, "not a schedule")
    with pytest.raises(ValueError, match=r"\[N, H, K\]"):
        plstm_dag(x[0][:, 0], *x[1:], s)
    if "triton" not in dag_backends():
        with pytest.raises(RuntimeError, match="triton"):
            plstm_dag(*x, s, backend="triton")
