"""The GIN-like hybrid variants of ``benchmarks/freesolv_variants.py``: they build, train one step, keep every
pLSTM layer, put their LayerScale in the pLSTM learning-rate group, and predict each molecule independently of
its batch in eval mode."""
import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("rdkit")
from torch_geometric.loader import DataLoader  # noqa: E402

from plstm_graph.chem import smiles_to_dag  # noqa: E402
from plstm_graph.models import molecule  # noqa: E402
from plstm_graph.nn import PLSTMGraphLayer  # noqa: E402
from plstm_graph.train import lightning  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "freesolv_variants.py"
SMILES = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "C1CC1C#N", "OCC(O)CO"]


def _load():
    spec = importlib.util.spec_from_file_location("freesolv_variants", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("variant", ["gps", "gpsrms", "gine"])
def test_hybrid_variant_trains_and_is_per_molecule(variant, monkeypatch):
    fv = _load()
    # patch() rewrites these for the process; monkeypatch puts them back after the test
    monkeypatch.setattr(molecule.MoleculeModel, "__init__", molecule.MoleculeModel.__init__)
    monkeypatch.setattr(lightning, "plstm_branch_parameters", lightning.plstm_branch_parameters)
    fv.patch(variant)
    torch.manual_seed(0)
    model = molecule.MoleculeModel("plstm", num_tasks=1, hidden=16, num_layers=4, num_heads=2, dropout=0.1)
    blocks = list(model.backbone.blocks)
    assert all(isinstance(b, fv.HybridBlock) for b in blocks)
    assert [(b.layer.mode, b.layer.reverse) for b in blocks] == [("P", False), ("P", True), ("D", False), ("D", True)]
    branch = {id(p) for p in lightning.plstm_branch_parameters(model)}
    layers = [m for m in model.modules() if isinstance(m, PLSTMGraphLayer)]
    assert len(layers) == 4
    assert branch == {id(p) for m in layers for p in m.parameters()} | {id(b.layer_scale) for b in blocks}
    graphs = [smiles_to_dag(s, y=[float(i)]) for i, s in enumerate(SMILES)]
    batch = next(iter(DataLoader(graphs, batch_size=len(graphs))))
    out = model(batch)
    assert out.shape == (len(SMILES), 1) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(next(b.layer.parameters()).grad is not None for b in blocks)
    assert all(b.conv.nn[0].weight.grad.abs().sum() > 0 for b in blocks)
    model.eval()
    with torch.no_grad():
        together = model(batch)
        alone = torch.cat([model(next(iter(DataLoader([g], batch_size=1)))) for g in graphs])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
