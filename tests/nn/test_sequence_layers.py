"""MultiScaleRetention and PLSTM1DLayer: modes agree, step decoding reproduces forward, and retention
matches RetNet's parallel formula written out here independently."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from plstm_graph.nn import MultiScaleRetention, PLSTM1DLayer

F64 = torch.float64


def _with_mode(layer, mode):
    layer.mode = mode
    return layer


@pytest.mark.parametrize("cls", [MultiScaleRetention, PLSTM1DLayer])
def test_modes_agree_and_step_matches_forward(cls):
    torch.manual_seed(0)
    layer = cls(dim=24, num_heads=3, chunk_size=8).double()
    x = torch.randn(2, 21, 24, dtype=F64)
    y, state = _with_mode(layer, "chunkwise")(x, output_state=True)
    for mode in ("parallel", "recurrent"):
        y2, state2 = _with_mode(layer, mode)(x, output_state=True)
        torch.testing.assert_close(y2, y)
        torch.testing.assert_close(state2, state)
    layer.mode = "chunkwise"
    s, ys = None, []
    for t in range(x.shape[1]):
        yt, s = layer.step(x[:, t], s, t) if cls is MultiScaleRetention else layer.step(x[:, t], s)
        ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, 1), y)
    torch.testing.assert_close(s, state)


def test_retention_continues_from_state():
    torch.manual_seed(1)
    layer = MultiScaleRetention(dim=16, num_heads=2, chunk_size=4).double()
    x = torch.randn(1, 19, 16, dtype=F64)
    full = layer(x)
    a, s = layer(x[:, :7], output_state=True)
    b = layer(x[:, 7:], state=s, offset=7)
    torch.testing.assert_close(torch.cat([a, b], 1), full)


def test_retention_matches_written_out_formula():
    torch.manual_seed(2)
    dim, H, T = 16, 2, 11
    layer = MultiScaleRetention(dim=dim, num_heads=H).double()
    x = torch.randn(1, T, dim, dtype=F64)
    K, V = dim // H, 2 * dim // H
    q = (x @ layer.q_proj.weight.T).view(T, H, K)
    k = (x @ layer.k_proj.weight.T).view(T, H, K)
    v = (x @ layer.v_proj.weight.T).view(T, H, V)
    # rotary: complex rotation of pairs (2i, 2i+1) by angle n * 10000^-(i/(K/2-1))
    freq = 1.0 / 10000 ** torch.linspace(0, 1, K // 2, dtype=F64)
    n = torch.arange(T, dtype=F64)
    rot = torch.polar(torch.ones(T, K // 2, dtype=F64), n[:, None] * freq[None, :])[:, None, :]  # [T, 1, K/2]
    qc = torch.view_as_complex(q.reshape(T, H, K // 2, 2).contiguous()) * rot
    kc = torch.view_as_complex(k.reshape(T, H, K // 2, 2).contiguous()) * rot
    scores = torch.einsum("thd,shd->hts", qc, kc.conj()).real * K ** -0.5  # Re(q e^{in} (k e^{im})^*)
    gamma = 1 - 2.0 ** (-5 - torch.arange(H, dtype=F64))
    dist = n[:, None] - n[None, :]
    decay = torch.where(dist >= 0, gamma[:, None, None] ** dist.clamp(min=0), torch.zeros((), dtype=F64))
    o = torch.einsum("hts,shv->thv", scores * decay, v)
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5)
    expect = (F.silu(x[0] @ layer.g_proj.weight.T) * o.reshape(T, H * V)) @ layer.out_proj.weight.T
    torch.testing.assert_close(layer(x)[0], expect)


def test_plstm1d_gate_ranges_and_inits():
    layer = PLSTM1DLayer(dim=8, num_heads=2)
    s, t, m, d = layer.gates(torch.zeros(3, 8))
    torch.testing.assert_close(s, torch.full_like(s, torch.sigmoid(torch.tensor(-4.0)).item()))
    torch.testing.assert_close(t, torch.full_like(t, torch.tanh(torch.tensor(5.0)).item()))
    torch.testing.assert_close(d, torch.full_like(d, torch.sigmoid(torch.tensor(-6.0)).item()))
    s, t, m, d = layer.gates(100 * torch.randn(50, 8))
    assert ((s > 0) & (s < 1)).all() and ((t >= -1) & (t <= 1)).all() and (t < 0).any()
    y = layer(torch.randn(2, 9, 8))
    y.square().sum().backward()
    assert layer.gate_proj.weight.grad.abs().sum() > 0


def test_bad_dims():
    with pytest.raises(ValueError, match="multiples"):
        MultiScaleRetention(dim=10, num_heads=3)
    with pytest.raises(ValueError, match="even"):
        MultiScaleRetention(dim=9, num_heads=3)
