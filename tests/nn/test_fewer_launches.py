"""The launch-saving forms of the gates and of the molecule feature embedding equal the formulas they replace."""
import pytest
import torch

from plstm_graph import compile_dag
from plstm_graph.nn import PLSTMGraphLayer, p_normalize

from ..conftest import hostile_dags, random_dag


def _old_gates(layer: PLSTMGraphLayer, x, schedule, edge_attr):
    """The per-slot gather formula of PLSTMGraphLayer._gates before the refactoring (verbatim)."""
    n, h = x.size(0), layer.num_heads
    g = layer.gate_node(x).float().view(n, h, 8)
    e = layer._edge_gate_features(edge_attr, schedule)  # [E, H, 4] (named _edge_features before)
    tail, head = schedule.edge_index
    line_a, line_b = schedule.line_index
    shared = tail[line_b]
    s = g[tail, :, 0] + g[head, :, 1] + layer.source_bias
    m = g[head, :, 2] + g[tail, :, 3] + layer.mark_bias
    t = g[tail[line_a], :, 4] + g[shared, :, 5] + g[head[line_b], :, 6] + layer.transition_bias
    d = g[:, :, 7] + layer.direct_bias
    if e is not None:
        s = s + e[:, :, 0]
        m = m + e[:, :, 1]
        t = t + e[line_a, :, 2] + e[line_b, :, 3]
    source, transition = torch.sigmoid(s), torch.tanh(layer.transition_scale * t)
    mark, direct = torch.sigmoid(m), torch.sigmoid(d)
    if layer.mode == "P" and layer.normalize:
        source = p_normalize(source, tail, n)
        transition = p_normalize(transition, line_a, schedule.num_edges)
    return source, transition, mark, direct


@pytest.mark.parametrize("mode", ["P", "D"])
@pytest.mark.parametrize("edge_dim", [None, 5])
@pytest.mark.parametrize("case", hostile_dags() + [("random40", random_dag(40, 0.2, 7), 40)], ids=lambda c: c[0])
def test_gates_equal_old_formula(mode, edge_dim, case):
    _, ei, n = case
    torch.manual_seed(0)
    s = compile_dag(ei, num_nodes=n, mode=mode)
    layer = PLSTMGraphLayer(12, 3, mode=mode, edge_dim=edge_dim, gate_init_std=0.5, fused_gates=False)
    x = torch.randn(n, 12, requires_grad=True)
    e = torch.randn(s.num_edges, edge_dim, requires_grad=True) if edge_dim else None
    new = layer.gates(x, s, e)
    old = _old_gates(layer, x, s, e)
    for a, b in zip(new, old):
        assert torch.equal(a, b)  # same values, same order of sums: bitwise equal
    w = [torch.randn_like(t) for t in new]
    inputs = [x] + ([e] if e is not None else []) + list(layer.parameters())
    ga = torch.autograd.grad(sum((t * wi).sum() for t, wi in zip(new, w)), inputs, allow_unused=True)
    gb = torch.autograd.grad(sum((t * wi).sum() for t, wi in zip(old, w)), inputs, allow_unused=True)
    for a, b in zip(ga, gb):
        if a is None or b is None:
            assert a is None and b is None
        else:  # gradients are accumulated in another order: equal up to rounding
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_feature_embedding_equals_per_column_sum():
    from plstm_graph.models.molecule import FeatureEmbedding

    torch.manual_seed(0)
    dims = (119, 5, 12, 12, 10, 6, 6, 2, 2)
    emb = FeatureEmbedding(dims, 16)
    x = torch.stack([torch.randint(0, d, (50,)) for d in dims], 1)
    out = emb(x)
    ref = emb.tables[0](x[:, 0])
    for f in range(1, len(dims)):
        ref = ref + emb.tables[f](x[:, f])
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    w = torch.randn_like(out)
    g_new = torch.autograd.grad((out * w).sum(), list(emb.parameters()))
    g_old = torch.autograd.grad((ref * w).sum(), list(emb.parameters()))
    for a, b in zip(g_new, g_old):
        torch.testing.assert_close(a, b)
    assert "offsets" not in emb.state_dict()  # checkpoints unchanged
    assert FeatureEmbedding((4,), 3)(torch.tensor([[1], [3]])).shape == (2, 3)
    assert FeatureEmbedding((4, 2), 3)(torch.zeros(0, 2, dtype=torch.long)).shape == (0, 3)


@pytest.mark.parametrize("mode", ["P", "D"])
def test_fused_projection_equals_four_linears(mode):
    """PLSTMGraphLayer.heads projects q, k, v and the node gates with one stacked GEMM (PLSTMGraphLayer.project);
    it equals the four Linear modules applied one by one, output and every gradient."""
    torch.manual_seed(0)
    n = 30
    s = compile_dag(random_dag(n, 0.2, 3), num_nodes=n, mode=mode)
    layer = PLSTMGraphLayer(12, 3, mode=mode, edge_dim=5, gate_init_std=0.5)
    x = torch.randn(n, 12, requires_grad=True)
    e = torch.randn(s.num_edges, 5, requires_grad=True)

    def old_heads():  # the per-projection form of PLSTMGraphLayer.heads before the fusion (verbatim)
        h, hd = layer.num_heads, layer.head_dim
        gates = layer._gates(x, s, e)
        q = layer.q_proj(x).view(n, h, hd) * (hd ** -0.5)
        k = layer.k_proj(x).view(n, h, hd)
        v = layer.v_proj(x).view(n, h, hd)
        from plstm_graph.ops import plstm_dag

        return plstm_dag(q, k, v, gates.source, gates.transition, gates.mark, gates.direct, s, backend="auto")

    for proj, lin in zip(layer.project(x), (layer.q_proj, layer.k_proj, layer.v_proj, layer.gate_node)):
        torch.testing.assert_close(proj, lin(x), rtol=1e-6, atol=1e-6)
    new, old = layer.heads(x, s, e), old_heads()
    torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-6)
    w = torch.randn_like(new)
    inputs = [x, e] + list(layer.parameters())
    ga = torch.autograd.grad((new * w).sum(), inputs, allow_unused=True)
    gb = torch.autograd.grad((old * w).sum(), inputs, allow_unused=True)
    for a, b in zip(ga, gb):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert set(layer.state_dict()) >= {"q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_node.weight"}


def test_local_bond_mix_cached_pairs_equal_concatenation():
    from plstm_graph.nn import LocalBondMix

    torch.manual_seed(0)
    s = compile_dag(random_dag(25, 0.25, 4), num_nodes=25, mode="P")
    mix = LocalBondMix(6, edge_dim=3)
    h, ea = torch.randn(25, 6), torch.randn(s.num_edges, 3)
    src, dst = s.both_directions()
    ei = s.edge_index
    assert torch.equal(src, torch.cat([ei[0], ei[1]])) and torch.equal(dst, torch.cat([ei[1], ei[0]]))
    assert s.both_directions()[0] is src  # cached on the schedule
    assert torch.equal(mix(h, ei, ea, both_directions=(src, dst)), mix(h, ei, ea))
    moved = s.to("meta")
    assert moved.both_directions()[0].device.type == "meta"  # travels with the schedule


@pytest.mark.parametrize("local_mix", [True, False, "gine"])
def test_stack_edge_projections_in_one_gemm_equal_per_block(local_mix):
    """PLSTMGraphStack makes every block's edge-feature maps (the layer's gate_edge, LocalBondMix.edge) in one
    GEMM up front; the stack's output and every gradient equal running each block on the raw edge features."""
    from plstm_graph.nn import PLSTMGraphStack

    torch.manual_seed(0)
    n = 30
    ei = random_dag(n, 0.2, 5)
    scheds = {(m, r): (compile_dag(ei, num_nodes=n, mode=m).reverse() if r else compile_dag(ei, num_nodes=n, mode=m))
              for m in ("P", "D") for r in (False, True)}
    stack = PLSTMGraphStack(12, 3, edge_dim=5, local_mix=local_mix, layer_scale=0.5, gate_init_std=0.5)
    stack.fuse_edge_projections = True  # the default fuses on CUDA only
    x = torch.randn(n, 12, requires_grad=True)
    e = torch.randn(scheds[("P", False)].num_edges, 5, requires_grad=True)
    proj = stack.edge_projections(e)
    for block, (gate, local) in zip(stack.blocks, proj):
        torch.testing.assert_close(gate, block.layer.gate_edge(e), rtol=1e-6, atol=1e-6)
        assert (local is None) == (not local_mix)
        if local_mix:
            torch.testing.assert_close(local, block.local.edge(e), rtol=1e-6, atol=1e-6)

    def per_block():
        h = x
        for i, block in enumerate(stack.blocks):
            h = block(h, stack._schedule_for(i, scheds), e)  # edge_proj=None: each block maps e itself
        return stack.norm(h)

    new, old = stack(x, scheds, e), per_block()
    torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-6)
    w = torch.randn_like(new)
    inputs = [x, e] + list(stack.parameters())
    ga = torch.autograd.grad((new * w).sum(), inputs)
    gb = torch.autograd.grad((old * w).sum(), inputs)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not any("bias_pad" in k for k in stack.state_dict())  # checkpoints unchanged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_multihead_rmsnorm_equals_formula(dtype):
    """MultiHeadRMSNorm runs torch's rms_norm per head (fused on CUDA); it equals the explicit formula
    ``y * rsqrt(mean_V(y^2) + eps) * weight[h]`` in at least float32, output and gradients."""
    from plstm_graph.nn import MultiHeadRMSNorm

    torch.manual_seed(0)
    norm = MultiHeadRMSNorm(3, 5)
    with torch.no_grad():
        norm.weight.normal_()
    y = (torch.randn(7, 3, 5) * torch.logspace(-3, 2, 7)[:, None, None]).to(dtype).requires_grad_(True)
    out = norm(y)
    y32 = y.float() if dtype == torch.bfloat16 else y
    ref = (y32 * torch.rsqrt(y32.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.to(y32.dtype)).to(dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref)
    w = torch.randn_like(out)
    ga = torch.autograd.grad((out * w).sum(), [y, norm.weight])
    gb = torch.autograd.grad((ref * w).sum(), [y, norm.weight])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-5 if dtype != torch.bfloat16 else 2e-2, atol=1e-5)


def test_gine_block_equals_pyg_gineconv():
    """PLSTMGraphBlock(local_mix="gine") is ``x + drop(s * pLSTM(RMSNorm(x)))`` then ``x + drop(ReLU(GINEConv(x)))``
    with PyG's GINEConv (GIN's MLP, train_eps, edge_dim) over both directions of every bond: same parameters,
    same output and gradients (in training mode: BatchNorm on batch statistics)."""
    from torch_geometric.data import Batch, Data
    from torch_geometric.nn import GINEConv

    from plstm_graph.graph import attach_schedules
    from plstm_graph.nn.blocks import PLSTMGraphBlock

    torch.manual_seed(0)
    graphs = []
    for seed in range(4):
        ei = random_dag(8, 0.35, seed)
        graphs.append(attach_schedules(Data(edge_index=ei, num_nodes=8, edge_attr=torch.randn(ei.size(1), 6))))
    batch = Batch.from_data_list(graphs)
    block = PLSTMGraphBlock(6, 2, mode="D", reverse=True, edge_dim=6, local_mix="gine", layer_scale=0.5)
    with torch.no_grad():
        block.gine_eps.fill_(0.3)
    conv = GINEConv(block.mlp, train_eps=True, edge_dim=6)
    with torch.no_grad():
        conv.eps.copy_(block.gine_eps)
        conv.lin.weight.copy_(block.local.edge.weight)
        conv.lin.bias.copy_(block.local.edge.bias)
    x = torch.randn(batch.num_nodes, 6, requires_grad=True)
    ea = batch.edge_attr
    out = block(x, batch, ea)
    mid = x + block.layer_scale * block.layer(block.norm1(x), batch, ea)
    ei2 = torch.cat([batch.edge_index, batch.edge_index.flip(0)], 1)
    ref = mid + torch.relu(conv(mid, ei2, torch.cat([ea, ea])))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    (rx,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-5)
    assert not hasattr(block, "norm2")
    with pytest.raises(ValueError, match="local_mix must be"):
        PLSTMGraphBlock(6, 2, local_mix="ginx")


@pytest.mark.parametrize("train", [False, True])
def test_gin_stack_with_zero_layer_scale_is_the_gin_baseline(train):
    """local_mix="gin": GIN's layer without a residual, the pLSTM branch adding to its input. With the LayerScale at
    zero the molecule model is the ``gin`` baseline (PyG's BasicGNN with GINEConv layers) given the same weights:
    same predictions and the same gradients for every shared parameter; a non-zero scale changes them."""
    pytest.importorskip("rdkit")
    from torch_geometric.loader import DataLoader

    from plstm_graph.chem import smiles_to_dag
    from plstm_graph.models.molecule import MoleculeModel

    torch.manual_seed(0)
    batch = next(iter(DataLoader([smiles_to_dag(s) for s in ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "OCC(N)C"]],
                                 batch_size=4)))
    ours = MoleculeModel("plstm", hidden=16, num_layers=3, local_mix="gin", layer_scale=0.0, dropout=0.0)
    gin = MoleculeModel("gin", hidden=16, num_layers=3, dropout=0.0)
    with torch.no_grad():
        for blk in ours.backbone.blocks:
            blk.gine_eps.fill_(0.2)
        pairs = [(ours.atom_encoder, gin.atom_encoder), (ours.bond_encoder, gin.bond_encoder), (ours.head, gin.head)]
        for blk, conv in zip(ours.backbone.blocks, gin.backbone.convs):
            pairs += [(blk.mlp, conv.nn), (blk.local.edge, conv.lin)]
            conv.eps.copy_(blk.gine_eps)
        for a, b in pairs:
            b.load_state_dict(a.state_dict())
    assert isinstance(ours.backbone.norm, torch.nn.Identity) and ours.backbone.blocks[-1].last
    ours.train(train), gin.train(train)
    out, ref = ours(batch), gin(batch)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    ref.square().sum().backward()
    for a, b in pairs:
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        for blk in ours.backbone.blocks:
            blk.layer_scale.fill_(0.5)
    assert not torch.allclose(ours(batch), gin(batch), atol=1e-4)
