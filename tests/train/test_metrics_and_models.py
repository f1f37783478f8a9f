"""Metrics (against OGB's Evaluator and scikit-learn), the masked loss and every model's forward/backward."""
import numpy as np
import pytest
import torch

pytest.importorskip("rdkit")
from torch_geometric.loader import DataLoader  # noqa: E402

from plstm_graph.chem import smiles_to_dag  # noqa: E402
from plstm_graph.models.molecule import MODELS, MoleculeModel  # noqa: E402
from plstm_graph.train.metrics import compute_metrics  # noqa: E402


def test_regression_metrics_match_ogb_evaluator_and_sklearn():
    from ogb.graphproppred import Evaluator
    from sklearn.metrics import mean_absolute_error, r2_score

    rng = np.random.default_rng(0)
    y = rng.normal(size=(50, 1))
    p = y + rng.normal(scale=0.5, size=(50, 1))
    m = compute_metrics("regression", y, p)
    assert m["rmse"] == pytest.approx(Evaluator("ogbg-molfreesolv").eval({"y_true": y, "y_pred": p})["rmse"])
    assert m["mae"] == pytest.approx(mean_absolute_error(y, p))
    assert m["r2"] == pytest.approx(r2_score(y, p))


def test_classification_metrics_match_ogb_evaluator_and_mask_nan():
    from ogb.graphproppred import Evaluator
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(1)
    y = (rng.random((60, 1)) > 0.4).astype(float)
    p = np.clip(y * 0.3 + rng.random((60, 1)) * 0.7, 0, 1)
    m = compute_metrics("classification", y, p)
    assert m["roc_auc"] == pytest.approx(Evaluator("ogbg-molbbbp").eval({"y_true": y, "y_pred": p})["rocauc"])
    assert m["pr_auc"] == pytest.approx(average_precision_score(y[:, 0], p[:, 0]))
    assert m["accuracy"] == pytest.approx(((p > 0.5) == (y > 0.5)).mean())
    y_missing = y.copy()
    y_missing[:10] = np.nan  # masked entries change nothing but the subset
    assert compute_metrics("classification", y_missing, p)["roc_auc"] == pytest.approx(
        compute_metrics("classification", y[10:], p[10:])["roc_auc"])


def test_multitarget_average_skips_one_class_targets():
    y = np.array([[0, 1], [1, 1], [0, 1], [1, 1]], dtype=float)
    p = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.5], [0.7, 0.6]])
    assert compute_metrics("classification", y, p)["roc_auc"] == pytest.approx(1.0)  # only target 0 has two classes


def test_masked_loss_ignores_missing():
    from plstm_graph.train.lightning import masked_loss

    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    y = torch.tensor([[2.0, float("nan")], [float("nan"), 6.0]])
    assert float(masked_loss("regression", pred, y)) == pytest.approx((1 + 4) / 2)
    assert float(masked_loss("regression", pred, torch.full_like(y, float("nan")))) == 0.0


SMILES = ["CCO", "C", "c1ccccc1O", "[Na+].[Cl-]", "CC(=O)Oc1ccccc1C(=O)O", "N#N", "C1CC1"]


@pytest.mark.parametrize("name", MODELS)
def test_every_model_trains_and_is_per_molecule(name):
    torch.manual_seed(0)
    graphs = [smiles_to_dag(s, y=[float(i)]) for i, s in enumerate(SMILES)]
    model = MoleculeModel(name, num_tasks=2, hidden=16, num_layers=2, num_heads=2)
    batch = next(iter(DataLoader(graphs, batch_size=len(graphs))))
    out = model(batch)
    assert out.shape == (len(SMILES), 2) and torch.isfinite(out).all()
    out.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        together = model(batch)
        alone = torch.cat([model(next(iter(DataLoader([g], batch_size=1)))) for g in graphs])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_unknown_model_is_an_error():
    with pytest.raises(ValueError, match="unknown model"):
        MoleculeModel("transformer")


def test_train_loader_drops_a_lone_last_molecule():
    from plstm_graph.train.lightning import MoleculeDataModule

    graphs = [smiles_to_dag("C", y=[0.0]) for _ in range(9)]  # 9 = 2 * 4 + 1: a lone single-atom batch
    dm = MoleculeDataModule(graphs, graphs, graphs, batch_size=4)
    assert [b.num_graphs for b in dm.train_dataloader()] == [4, 4]
    assert [b.num_graphs for b in dm.val_dataloader()] == [4, 4, 1]  # evaluation keeps every molecule
    model = MoleculeModel("gin", hidden=8, num_layers=2)
    for b in dm.train_dataloader():
        model(b)  # BatchNorm would fail on a one-node batch
