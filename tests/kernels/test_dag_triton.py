"""Triton DAG kernels (``kernels/dag.py``) against the readable reference: outputs and every input gradient.

Runs on CPU through the Triton interpreter (``TRITON_INTERPRET=1``, set here before triton is imported),
or on CUDA when a GPU is present. The interpreter is slow (~0.3 ms per tile op, ~50 ms per program), so
the hostile DAGs are batched into one disjoint union per call: the kernels must treat every component
independently, which is itself a property under test (SPEC section 6).
"""
import os
import subprocess
import sys

import pytest
import torch

from ._triton_setup import DEVICE  # noqa: E402,I001  (first: sets TRITON_INTERPRET, skips without triton)

from plstm_graph import compile_dag, dag_backends, plstm_dag  # noqa: E402
from plstm_graph.kernels import dag as kdag  # noqa: E402


def _hostile_parts():
    """(edge list, num_nodes) of small DAGs that stress the kernels' index handling."""
    g = torch.Generator().manual_seed(3)
    rnd_edges = []
    perm = torch.randperm(11, generator=g).tolist()  # random DAG with node ids not in topological order
    for i in range(11):
        for j in range(i + 1, 11):
            if torch.rand(1, generator=g).item() < 0.3:
                rnd_edges.append((perm[i], perm[j]))
    return [
        ([], 1),  # single node
        ([], 2),  # two isolated nodes (no edges at all)
        ([(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)], 6),  # chain
        ([(1, 0), (2, 0), (3, 0), (4, 0), (5, 0)], 6),  # fan-in (head has id 0)
        ([(0, 1), (0, 2), (0, 3), (0, 4), (0, 5)], 6),  # fan-out
        ([(0, 1), (0, 2), (1, 3), (2, 3), (0, 3), (3, 4)], 5),  # diamond with a skip edge
        ([(0, 1), (2, 3), (3, 4)], 6),  # disconnected parts and an isolated node
        (rnd_edges, 11),
    ]


def _union(parts, mode="P"):
    rows, off = [], 0
    for edges, n in parts:
        rows += [(a + off, b + off) for a, b in edges]
        off += n
    ei = torch.tensor(rows, dtype=torch.long).t().reshape(2, -1)
    return compile_dag(ei, num_nodes=off, mode=mode)


def _inputs(s, H, K, V, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, E, L = s.num_nodes, s.num_edges, s.num_line_edges
    shapes = [(N, H, K), (N, H, K), (N, H, V), (E, H), (L, H), (E, H), (N, H)]
    # gates of any sign (SPEC: negative transitions allowed)
    return [torch.randn(*sh, generator=g).to(dtype).to(DEVICE).requires_grad_() for sh in shapes]


def _check(s, xs, tol, **kw):
    ref_in = [x.detach().double().requires_grad_() for x in xs]
    y_ref = plstm_dag(*ref_in, s, backend="reference")
    dy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(DEVICE)
    g_ref = torch.autograd.grad(y_ref, ref_in, dy)
    y = kdag.plstm_dag_triton(*xs, s, **kw)
    assert y.dtype == xs[2].dtype and y.shape == y_ref.shape
    g = torch.autograd.grad(y, xs, dy.to(y.dtype))
    names = ["y", "dq", "dk", "dv", "dsource", "dtransition", "dmark", "ddirect"]
    for name, a, b, x in zip(names, (y,) + g, (y_ref,) + g_ref, [xs[2]] + list(xs)):
        assert a.dtype == x.dtype, name
        scale = b.abs().max().item() + 1e-6
        err = (a.double() - b).abs().max().item() if b.numel() else 0.0
        assert err <= tol * scale, f"{name}: max error {err:.3g} vs scale {scale:.3g} ({kw})"


@pytest.mark.parametrize("strategy", ["graph", "levels"])
def test_hostile_union_matches_reference(strategy):
    s = _union(_hostile_parts()).to(DEVICE)
    # K, V not powers of two: masked tiles
    _check(s, _inputs(s, H=1, K=5, V=3), 1e-5, strategy=strategy)


def test_recompute_chunks_and_heads():
    # several heads, D-mode, reversed DAG; recompute with a budget so small that every graph is its own chunk
    s = _union(_hostile_parts()[2:], mode="D").reverse().to(DEVICE)
    _check(s, _inputs(s, H=2, K=4, V=6, seed=1), 1e-5, strategy="graph", recompute=True, chunk_bytes=1)


@pytest.mark.parametrize("cap_edges", [1, 12])
def test_levels_recompute_segments(cap_edges):
    # cap 1: one level per segment (states carried across every boundary); 12: segments of several levels
    # with skip edges crossing them
    s = _union(_hostile_parts()[5:]).to(DEVICE)
    H, K, V = 1, 8, 8
    _check(s, _inputs(s, H=H, K=K, V=V, seed=2), 1e-5, strategy="levels", recompute=True,
           chunk_bytes=cap_edges * H * K * V * 4)
    segs = kdag._segments(s, kdag._plan(s, "levels"), cap_edges)
    assert len(segs) == s.num_levels if cap_edges == 1 else 1 < len(segs) < s.num_levels
    if cap_edges == 12:
        assert any(sg["x_pos"].numel() for sg in segs) and any(sg["d_pos"].numel() for sg in segs)
    else:  # a skip edge's state crosses several boundaries: checkpointed once, read from an older piece
        assert any(i < j - 1 for j, sg in enumerate(segs) for i, _ in sg["x_from"])
    # every carried state is stored once: the pieces hold exactly the edges that cross some boundary
    stored = torch.cat([sg["piece_pos"] for sg in segs if "piece_pos" in sg]).cpu()
    crossing = torch.cat([sg["x_pos"] for sg in segs]).unique()
    assert stored.numel() == stored.unique().numel() and torch.equal(stored.sort().values, crossing)


def test_levels_recompute_second_backward_is_a_clear_error():
    s = _union(_hostile_parts()[5:6]).to(DEVICE)
    xs = _inputs(s, H=1, K=4, V=4, seed=3)
    y = kdag.plstm_dag_triton(*xs, s, strategy="levels", recompute=True, chunk_bytes=4 * 4 * 4)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="frees its checkpoints"):
        y.sum().backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_float32_states(dtype):
    s = _union(_hostile_parts()[5:7]).to(DEVICE)
    _check(s, _inputs(s, H=1, K=4, V=4, dtype=dtype, seed=3), 2e-2)


def test_dispatcher_offers_triton_and_mixed_gate_dtypes():
    assert kdag.available()
    assert "triton" in dag_backends()
    s = _union(_hostile_parts()[3:6]).to(DEVICE)
    xs = _inputs(s, H=1, K=3, V=2, seed=4)
    gates = [x.detach().double() for x in xs[3:]]  # gates in another dtype than q, k, v
    y = plstm_dag(*xs[:3], *gates, s, backend="triton")
    y_ref = plstm_dag(*(x.detach().double() for x in xs[:3]), *gates, s, backend="levels")
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)


def test_auto_strategy_choice():
    small = _union(_hostile_parts())
    assert kdag._choose_strategy(small) == "graph"
    # a wide single graph: 1 root -> 300 leaves -> 1 sink (3 levels, 600 edges)
    ei = torch.tensor([[0] * 300 + list(range(1, 301)), list(range(1, 301)) + [301] * 300])
    assert kdag._choose_strategy(compile_dag(ei, num_nodes=302)) == "levels"


def test_unsupported_head_dim_is_a_clear_error():
    s = _union(_hostile_parts()[:1]).to(DEVICE)
    xs = [x.detach() for x in _inputs(s, H=1, K=kdag.MAX_HEAD_DIM + 1, V=2)]
    with pytest.raises(ValueError, match="head dims"):
        kdag.plstm_dag_triton(*xs, s)
    with pytest.raises(ValueError, match="strategy"):
        kdag.plstm_dag_triton(*[x.detach() for x in _inputs(s, H=1, K=2, V=2)], s, strategy="fast")


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import plstm_graph\n"
        "from plstm_graph.kernels import dag\n"
        "assert not dag.available()\n"
        "assert 'triton' not in plstm_graph.dag_backends()\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_triton_is_imported_lazily():
    # importing the kernels (or asking for the backends) must not import triton: whether triton runs under
    # the CPU interpreter is fixed when triton is imported, and a test may set TRITON_INTERPRET later
    code = (
        "import os, sys\n"
        "os.environ.pop('TRITON_INTERPRET', None)\n"
        "import plstm_graph\n"
        "from plstm_graph.kernels import dag, sequence\n"
        "plstm_graph.dag_backends(); dag.available(); sequence.available()\n"
        "assert 'triton' not in sys.modules\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
