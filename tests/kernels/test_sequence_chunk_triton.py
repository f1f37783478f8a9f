"""Chunkwise Triton sequence kernels (``kernels/sequence_chunk.py``) against plstm_graph's float64 recurrent
oracle and torch chunkwise path (SPEC section 4): outputs, final state and the gradients of q, k, v and the
initial state, on hostile lengths (T = 1, 15, 63, 130 with chunk 16), head dims 16/32 and several V-blocks;
plus the dispatch of ``backend="triton"`` (chunk kernels for retention, scan fallback otherwise). Triton
interpreter on CPU (or CUDA when present)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed (pip install 'plstm-graph[triton]')")

from plstm_graph.kernels import sequence as kseq  # noqa: E402
from plstm_graph.kernels import sequence_chunk as kchunk  # noqa: E402
from plstm_graph.ops.sequence import plstm_sequence, retention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B, T, H, K, V, seed, positive_gates=False):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, K, generator=g)
    v = torch.randn(B, T, H, V, generator=g)
    if positive_gates:
        s, m, d = (torch.rand(B, T, H, generator=g) + 0.1 for _ in range(3))
    else:
        s, m, d = (torch.randn(B, T, H, generator=g) for _ in range(3))  # any sign: only tau must be > 0
    tau = torch.rand(B, T, H, generator=g) * 0.9 + 0.1  # data-dependent, in (0.1, 1)
    h0 = torch.randn(B, H, K, V, generator=g)
    return (q, k, v), (s, tau, m, d), h0


def _compare(outs, refs, tol, names):
    for name, a, b in zip(names, outs, refs):
        scale = b.abs().max().item() + 1e-6
        err = (a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item()
        assert err <= tol * scale, f"{name}: max error {err:.3g} vs scale {scale:.3g}"


def _check(B, T, H, K, V, chunk, dtype=torch.float32, tol=1e-5, with_h0=True, seed=0, gate_grad=True,
           segment=None, with_final_grad=True):
    (q, k, v), gates, h0 = _inputs(B, T, H, K, V, seed)
    gates = [g.to(DEVICE).requires_grad_(gate_grad) for g in gates]
    leaves = [x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v)]
    init = h0.to(DEVICE).requires_grad_() if with_h0 else None
    assert kchunk.chunk_supported(*leaves, *gates, init, None)
    y, fin = kchunk.plstm_sequence_chunk_triton(*leaves, *gates, initial_state=init,
                                                chunk_size=chunk, segment=segment)
    refs = [x.to(dtype).double().requires_grad_() for x in (q, k, v)]
    init_ref = h0.double().requires_grad_() if with_h0 else None
    gates_ref = [g.detach().cpu().double().requires_grad_() for g in gates]
    y_ref, fin_ref = plstm_sequence(*refs, *gates_ref, initial_state=init_ref,
                                    output_final_state=True, mode="recurrent")
    gen = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
    dfin = torch.randn(fin_ref.shape, generator=gen, dtype=torch.float64) * float(with_final_grad)
    ins = leaves + ([init] if with_h0 else []) + (gates if gate_grad else [])
    ins_ref = refs + ([init_ref] if with_h0 else []) + (gates_ref if gate_grad else [])
    g = torch.autograd.grad((y * dy.to(DEVICE, y.dtype)).sum() + (fin * dfin.to(DEVICE)).sum(), ins)
    g_ref = torch.autograd.grad((y_ref * dy).sum() + (fin_ref * dfin).sum(), ins_ref)
    assert y.dtype == dtype and fin.dtype == torch.float32 and y.shape == y_ref.shape
    assert all(a.dtype == b.dtype for a, b in zip(g, ins))
    names = ["y", "final", "dq", "dk", "dv"] + (["dinitial"] if with_h0 else [])
    names += ["dsource", "dtransition", "dmark", "ddirect"] if gate_grad else []
    assert len(names) == len(g) + 2
    _compare((y, fin) + g, (y_ref, fin_ref) + g_ref, tol, names)


@pytest.mark.parametrize("T", [1, 15, 63, 130])
def test_matches_recurrent_oracle_hostile_lengths(T):
    _check(B=2 if T < 100 else 1, T=T, H=2, K=16, V=32, chunk=16, seed=T)


def test_head_dims_not_powers_of_two_and_several_v_blocks():
    # K = 20 pads to a 32-wide tile; V = 80 spans two 64-wide V-blocks (the second one masked)
    _check(B=1, T=37, H=1, K=20, V=80, chunk=16, seed=3)


def test_state_passes_split_k():
    # K = 80: the state passes run two 64-row K-blocks (the second masked), the output kernels one 128 tile
    _check(B=1, T=20, H=1, K=80, V=16, chunk=16, seed=9)


@pytest.mark.parametrize("segment", [1, 2, 3])
def test_state_passes_cut_into_segments(segment):
    # T = 130 at chunk 16: 9 chunks, cut into segments of 1, 2 or 3 chunks (the last one short); the carried
    # states and adjoints must give the same outputs, final state and every gradient (gates included)
    _check(B=2, T=130, H=2, K=16, V=32, chunk=16, seed=20 + segment, segment=segment)


def test_segments_without_initial_state_or_final_grad():
    _check(B=1, T=70, H=1, K=32, V=16, chunk=16, seed=30, segment=2, with_h0=False, with_final_grad=False)


def test_segment_rule():
    # few programs on many chunks: segments of >= 8 chunks until ~512 programs; wide batches: one segment
    assert kchunk.segment_chunks(512, 32) == 32  # T = 32k at chunk 64, B = 1, H = 8, 2 x 2 tiles: 16 segments
    assert kchunk.segment_chunks(32, 512) == 32
    assert kchunk.segment_chunks(128, 256) == 128  # >= 256 programs: no segments
    assert kchunk.segment_chunks(128, 128) == 32
    assert kchunk.segment_chunks(7, 1) == 7
    assert kchunk.segment_chunks(9, 1, segment=2) == 2 and kchunk.segment_chunks(9, 1, segment=50) == 9


def test_no_initial_state_and_chunk_32():
    _check(B=1, T=40, H=2, K=32, V=16, chunk=32, with_h0=False, seed=4)


def test_constant_gates_without_grad():
    _check(B=1, T=40, H=1, K=16, V=16, chunk=16, seed=10, gate_grad=False)


def test_bf16_inputs():
    _check(B=1, T=33, H=1, K=16, V=16, chunk=16, dtype=torch.bfloat16, tol=4e-2, seed=5)


def test_retention_backend_triton_matches_torch_chunkwise():
    (q, k, v), _, h0 = _inputs(2, 50, 3, 16, 16, seed=6)
    outs, refs = [], []
    for backend, store in (("triton", outs), ("torch", refs)):
        leaves = [x.to(DEVICE).requires_grad_() for x in (q, k, v, h0)]
        o, fin = retention(*leaves[:3], initial_state=leaves[3], output_final_state=True, chunk_size=16,
                           backend=backend)
        gen = torch.Generator().manual_seed(7)
        dy, dfin = torch.randn(o.shape, generator=gen), torch.randn(fin.shape, generator=gen)
        store.extend([o, fin, *torch.autograd.grad((o * dy.to(DEVICE)).sum() + (fin * dfin.to(DEVICE)).sum(),
                                                   leaves)])
    _compare(outs, refs, 1e-5, ["o", "final", "dq", "dk", "dv", "dinitial"])


def test_dispatch_chunk_when_supported_scan_otherwise(monkeypatch):
    calls = []
    real = kchunk.plstm_sequence_chunk_triton
    monkeypatch.setattr(kchunk, "plstm_sequence_chunk_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    (q, k, v), gates, _ = _inputs(1, 9, 1, 16, 16, seed=8)
    dev = [x.to(DEVICE) for x in (q, k, v)]
    g = [x.to(DEVICE) for x in gates]
    kseq.plstm_sequence_triton(*dev, *g)
    assert len(calls) == 1
    g_grad = [g[0], g[1].clone().requires_grad_(), g[2], g[3]]
    kseq.plstm_sequence_triton(*dev, *g_grad)
    assert len(calls) == 2
    # a zero or negative transition, or packing: the recurrent scan, with correct results
    for bad in (0.0, -0.5):
        g_bad = [g[0], g[1].clone(), g[2], g[3]]
        g_bad[1][0, 3] = bad
        y, _ = kseq.plstm_sequence_triton(*dev, *g_bad)
        y_ref, _ = plstm_sequence(*dev, *g_bad, mode="recurrent")
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g_zero = g_bad
    y, _ = kseq.plstm_sequence_triton(*dev, *g, cu_seqlens=torch.tensor([0, 4, 9], device=DEVICE))
    assert len(calls) == 2
    with pytest.raises(ValueError, match="transition > 0"):
        kseq.plstm_sequence_triton(*dev, *g_zero, strategy="chunk")
    with pytest.raises(ValueError, match="strategy"):
        kseq.plstm_sequence_triton(*dev, *g, strategy="fast")


@pytest.mark.parametrize("gamma", [None, 0.9, [0.5, 0.8], -0.5])
def test_retention_tells_the_dispatcher_what_it_knows_about_its_decays(monkeypatch, gamma):
    # default decays, positive floats and CPU tensors are checked on the host: the dispatcher skips its
    # synchronising check; a decay <= 0 is not claimed positive and falls back to the scan, still correct
    seen = []
    real = kchunk.chunk_supported
    monkeypatch.setattr(kchunk, "chunk_supported",
                        lambda *a, **kw: seen.append(kw.get("transitions_positive")) or real(*a, **kw))
    (q, k, v), _, _ = _inputs(1, 20, 2, 16, 16, seed=11)
    dev = [x.to(DEVICE) for x in (q, k, v)]
    g = torch.tensor(gamma) if isinstance(gamma, list) else gamma
    o, _ = retention(*dev, gamma=g, chunk_size=16, backend="triton")
    o_ref, _ = retention(*dev, gamma=g, chunk_size=16, mode="recurrent")
    assert seen == [gamma is None or gamma != -0.5]
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)


def test_16bit_inputs_store_16bit_states_only_without_gate_gradients():
    assert kchunk._state_dtype(torch.bfloat16, gate_grad=False) == torch.bfloat16
    assert kchunk._state_dtype(torch.float16, gate_grad=False) == torch.float16
    assert kchunk._state_dtype(torch.bfloat16, gate_grad=True) == torch.float32
    assert kchunk._state_dtype(torch.float32, gate_grad=False) == torch.float32


@pytest.mark.parametrize("segment", [None, 2])
def test_bf16_inputs_without_gate_grads_16bit_states(segment):
    # the path retention takes in bf16: states stored in bf16, with and without segments
    _check(B=1, T=70, H=2, K=16, V=32, chunk=16, dtype=torch.bfloat16, tol=4e-2, seed=12, gate_grad=False,
           segment=segment)


@pytest.mark.parametrize("segment", [None, 3])
def test_per_head_gates_read_without_copies_match_the_oracle(segment):
    # gates that are one value per head expanded over [B, T, H] (retention; a learnable per-head decay) are read
    # as [H] vectors with zero strides; outputs and the gradients of the [H] parameters (summed over B and T)
    B, T, H, K, V = 2, 45, 3, 16, 16
    (q, k, v), _, h0 = _inputs(B, T, H, K, V, seed=13)
    g = torch.Generator().manual_seed(14)
    per_head = [torch.rand(H, generator=g) * 0.8 + 0.2 for _ in range(4)]
    outs = []
    for dev, dt in ((DEVICE, torch.float32), ("cpu", torch.float64)):
        leaves = [x.to(dev, dt).requires_grad_() for x in (q, k, v)]
        params = [p.to(dev, dt).requires_grad_() for p in per_head]
        gates = [p.expand(B, T, H) for p in params]
        init = h0.to(dev, dt)
        if dev == "cpu" and dt == torch.float64:
            y, fin = plstm_sequence(*leaves, *gates, initial_state=init, output_final_state=True, mode="recurrent")
        else:
            y, fin = kchunk.plstm_sequence_chunk_triton(*leaves, *gates, initial_state=init, chunk_size=16,
                                                        segment=segment)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
        grads = torch.autograd.grad((y * dy.to(y.device, y.dtype)).sum(), leaves + params)
        outs.append((y, fin) + grads)
    _compare(outs[0], outs[1], 1e-5, ["y", "final", "dq", "dk", "dv", "dsource", "dtransition", "dmark", "ddirect"])
