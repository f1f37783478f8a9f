"""PLSTM2DLayer (P/D parametrisation, four orientations) and the vision models."""
import pytest
import torch

from plstm_graph.models import PLSTMVisionModel, ViT
from plstm_graph.nn import PLSTM2DLayer


def _randomised(layer, scale=3.0, seed=0):
    """Large random gate weights and biases, so that the bounds are tested far from the init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.gates.weight.copy_(torch.randn(layer.gates.weight.shape, generator=gen) * scale)
        layer.gates.bias.copy_(torch.randn(layer.gates.bias.shape, generator=gen) * scale)
    return layer


@pytest.mark.parametrize("mode", ["P", "D"])
def test_shapes_any_size_and_gradients(mode):
    layer = PLSTM2DLayer(dim=16, num_heads=2, mode=mode)
    for Y, X in [(1, 1), (3, 5), (6, 2)]:
        x = torch.randn(2, Y, X, 16, requires_grad=True)
        y = layer(x)
        assert y.shape == x.shape
        y.square().sum().backward()
        assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in layer.parameters())


def test_p_mode_column_sums_bounded_for_any_input():
    layer = _randomised(PLSTM2DLayer(dim=8, num_heads=4, mode="P"))
    x = torch.randn(3, 5, 4, 8) * 10
    sr, sd, trr, trd, tdd, tdr, mr, md, direct = layer.grid_gates(x)
    eps = 1e-6
    assert ((trr.abs() + trd.abs()) <= 1 + eps).all()  # signal entering from the left
    assert ((tdr.abs() + tdd.abs()) <= 1 + eps).all()  # signal entering from the top
    assert ((sr.abs() + sd.abs()) <= 1 + eps).all()
    assert (trr < 0).any(), "randomised gates should reach negative transitions (test not vacuous)"
    assert ((trr.abs() + trd.abs()) > 0.99).any(), "and near-critical ones"


def test_d_mode_is_a_multitree():
    """trans_rd == 0 and, with those line edges removed, at most one path joins any two grid edges."""
    layer = _randomised(PLSTM2DLayer(dim=8, num_heads=2, mode="D"))
    gates = layer.grid_gates(torch.randn(1, 4, 4, 8))
    assert gates[3].abs().max() == 0  # trans_rd
    assert (gates[2].abs() <= 1).all() and (gates[4].abs() <= 1).all() and (gates[5].abs() <= 1).all()
    from plstm_graph.ops.grid import grid_dag

    g = grid_dag(4, 5)
    keep = g.line_kind != 1  # drop rd
    la, lb = g.schedule.line_index[:, keep]
    E = g.schedule.num_edges
    adj = torch.zeros(E, E, dtype=torch.float64)
    adj[la, lb] = 1.0
    paths = torch.linalg.inv(torch.eye(E, dtype=torch.float64) - adj) - torch.eye(E, dtype=torch.float64)
    assert paths.max() <= 1 + 1e-9
    full = torch.zeros(E, E, dtype=torch.float64)
    full[g.schedule.line_index[0], g.schedule.line_index[1]] = 1.0
    assert (torch.linalg.inv(torch.eye(E, dtype=torch.float64) - full)).max() > 1  # P-mode has several paths


@pytest.mark.parametrize("orientation", [0, 1, 2, 3])
def test_orientation_flow(orientation):
    """With only one orientation marked, an output depends only on inputs of its quadrant: orientation 0
    flows right+down (reads from above-left), 1 left+down, 2 right+up, 3 left+up."""
    torch.manual_seed(0)
    layer = PLSTM2DLayer(dim=8, num_heads=2, mode="P")
    with torch.no_grad():
        bias = layer.gates.bias.view(len(layer.gate_names), 4, 2)
        mark = layer.gate_names.index("mark")
        bias[mark] = -1e4
        bias[mark, orientation] = 0.0
        bias[layer.gate_names.index("source")] = 0.0
    Y, X, y0, x0 = 5, 6, 2, 3
    x = torch.randn(1, Y, X, 8, requires_grad=True)
    layer(x)[0, y0, x0].sum().backward()
    dep = x.grad[0].abs().sum(-1) > 0  # [Y, X]
    ys, xs = torch.meshgrid(torch.arange(Y), torch.arange(X), indexing="ij")
    ok_x = xs <= x0 if orientation in (0, 2) else xs >= x0
    ok_y = ys <= y0 if orientation in (0, 1) else ys >= y0
    quadrant = ok_x & ok_y
    assert not (dep & ~quadrant).any()
    assert dep[quadrant].all()


@pytest.mark.parametrize("mode", ["P", "D"])
def test_layer_backends_agree(mode):
    layer = _randomised(PLSTM2DLayer(dim=8, num_heads=2, mode=mode), scale=0.5).double()
    x = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    outs = []
    for backend, tile in [("reference", None), ("tiled", 2)]:
        layer.backend, layer.tile = backend, tile
        layer.zero_grad()
        y = layer(x)
        y.square().sum().backward()
        outs.append((y.detach(), [p.grad.clone() for p in layer.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("pool", ["corners", "mean"])
def test_vision_models_any_resolution(pool):
    torch.manual_seed(0)
    m = PLSTMVisionModel(image_size=16, patch_size=4, dim=16, num_heads=2, num_blocks=1, pool=pool)
    v = ViT(image_size=16, patch_size=4, dim=16, num_heads=2, depth=2, pool=pool)
    for model in (m, v):
        for size in (16, 24, 32):
            assert model(torch.randn(2, 3, size, size)).shape == (2, 2)
        with pytest.raises(ValueError):
            model(torch.randn(2, 3, 18, 16))
    kinds = [type(b.mixer).__name__ + b.mixer.mode for b in m.blocks]
    assert kinds == ["PLSTM2DLayerP", "PLSTM2DLayerD"]
    n_m, n_v = (sum(p.numel() for p in mod.parameters()) for mod in (m, v))
    assert 0.8 < n_m / n_v < 1.25


def test_bad_arguments():
    with pytest.raises(ValueError):
        PLSTM2DLayer(dim=10, num_heads=3)
    with pytest.raises(ValueError):
        PLSTM2DLayer(dim=8, num_heads=2, mode="X")
    with pytest.raises(ValueError):
        PLSTM2DLayer(dim=8, num_heads=2)(torch.randn(2, 3, 8))
