"""Molecule tables, CSV reading, splits and the on-disk cache."""
import numpy as np
import pytest
import torch

pytest.importorskip("rdkit")

from plstm_graph.datasets import molecules as M  # noqa: E402
from plstm_graph.datasets.splits import kfold_split, make_split, murcko_scaffold, random_split, scaffold_split  # noqa: E402


def _write(tmp_path, text, name="mols.csv"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_csv_multi_target_blank_cells_are_nan(tmp_path):
    path = _write(tmp_path, "smi,a,b\nCCO,1.5,\nc1ccccc1,,2\nCC,3,4\n")
    t = M.load_csv(path, "smi", ["a", "b"])
    assert t.task == "regression" and t.target_names == ["a", "b"]
    np.testing.assert_array_equal(np.isnan(t.targets), [[False, True], [True, False], [False, False]])
    assert t.row_numbers == [2, 3, 4]


def test_csv_classification_inferred_and_checked(tmp_path):
    path = _write(tmp_path, "smiles,y\nCCO,1\nCC,0\nCCC,\n")
    assert M.load_csv(path, "smiles", ["y"]).task == "classification"
    bad = _write(tmp_path, "smiles,y\nCCO,1\nCC,2\n", "bad.csv")
    with pytest.raises(ValueError, match="0 or 1"):
        M.load_csv(bad, "smiles", ["y"], task="classification")


@pytest.mark.parametrize("text,cols,match", [
    ("", ("smiles", ["y"]), "empty"),
    ("smiles,y\n", ("smiles", ["y"]), "no rows"),
    ("smiles,y\nCCO,1\n", ("smi", ["y"]), "column 'smi'"),
    ("smiles,y\nCCO,1\n", ("smiles", ["z"]), "column 'z'"),
    ("smiles,y\nCCO,1\nCC,abc\n", ("smiles", ["y"]), "line 3"),
    ("smiles,y\nCCO,\nCC,\n", ("smiles", ["y"]), "no values"),
])
def test_csv_user_mistakes(tmp_path, text, cols, match):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=match):
        M.load_csv(path, *cols)


def test_csv_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        M.load_csv(str(tmp_path / "nope.csv"), "smiles", ["y"])


def test_build_graphs_skips_invalid_with_row_numbers_and_caches(tmp_path):
    path = _write(tmp_path, "smiles,y\nCCO,1\nnot_a_smiles,2\nC,3\n,4\nc1ccccc1,5\n")
    t = M.load_csv(path, "smiles", ["y"])
    with pytest.warns(UserWarning, match="line 3"):
        g = M.build_graphs(t, cache_dir=str(tmp_path / "cache"), progress=False)
    assert g.rows == [0, 2, 4] and [r for r, _, _ in g.invalid] == [3, 5]
    assert [float(d.y) for d in g.graphs] == [1.0, 3.0, 5.0]
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1
    # a second build reads the cache and gives the same tensors
    g2 = M.build_graphs(t, cache_dir=str(tmp_path / "cache"), progress=False, warn=False)
    for a, b in zip(g.graphs, g2.graphs):
        for k in a.keys():
            va, vb = a[k], b[k]
            assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb


def test_cache_key_changes_with_featurisation(tmp_path, monkeypatch):
    t = M.MoleculeTable("demo", ["CCO"], [[1.0]], ["y"], "regression", [2])
    M.build_graphs(t, cache_dir=str(tmp_path), progress=False)
    import plstm_graph.chem.featurize as F

    monkeypatch.setattr(F, "FEATURIZATION_VERSION", F.FEATURIZATION_VERSION + "-changed")
    M.build_graphs(t, cache_dir=str(tmp_path), progress=False)
    assert len(list(tmp_path.iterdir())) == 2


def test_corrupt_cache_is_rebuilt(tmp_path):
    t = M.MoleculeTable("demo", ["CCO", "CC"], [[1.0], [2.0]], ["y"], "regression", [2, 3])
    M.build_graphs(t, cache_dir=str(tmp_path), progress=False)
    (f,) = list(tmp_path.iterdir())
    f.write_bytes(b"garbage")
    assert len(M.build_graphs(t, cache_dir=str(tmp_path), progress=False)) == 2


def test_shipped_datasets_have_documented_sizes():
    fs = M.load_freesolv()
    assert len(fs) == 642 and fs.task == "regression" and not np.isnan(fs.targets).any()
    b = M.load_b3db("classification")
    assert len(b) == 7807 and set(np.unique(b.targets)) == {0.0, 1.0}
    assert len(M.load_b3db("regression")) == 1058
    with pytest.raises(ValueError, match="unknown data set"):
        M.load_dataset("tox21")


def test_qm9_reader_on_a_small_file(tmp_path):
    (tmp_path / "qm9_part1.csv").write_text("XYZ_file,SMILES,HOMO_au,LUMO_au\na,C,-0.3,0.1\nb,CO,-0.25,0.05\nc,N,-0.2,0.0\n")
    t = M.load_qm9(targets=["HOMO_au", "LUMO_au"], root=str(tmp_path), limit=2)
    assert t.smiles == ["C", "CO"] and t.targets.shape == (2, 2)
    with pytest.raises(ValueError, match="no column"):
        M.load_qm9(targets=["nope"], root=str(tmp_path))


SMILES = ["c1ccccc1C", "c1ccccc1O", "c1ccccc1N", "C1CCCCC1C", "C1CCCCC1O", "C1CC1", "C1CC1C", "CCO", "CCN", "CCC",
          "c1ccncc1", "c1ccncc1C", "C1CCNCC1", "O=C1CCCC1", "c1ccc2ccccc2c1", "c1ccc2ccccc2c1O", "CC(=O)O", "N#N",
          "c1ccoc1", "c1ccsc1"]


@pytest.mark.parametrize("kind", ["random", "scaffold", "kfold", "scaffold-kfold"])
def test_splits_partition_and_are_seeded(kind):
    a = make_split(kind, SMILES, seed=3)
    b = make_split(kind, SMILES, seed=3)
    assert a == b
    allidx = sorted(a["train"] + a["val"] + a["test"])
    assert allidx == list(range(len(SMILES)))
    assert a["train"] and a["test"]


def test_scaffold_split_keeps_scaffolds_together():
    for seed in range(4):
        s = scaffold_split(SMILES, sizes=(0.6, 0.2, 0.2), seed=seed)
        scaf = {name: {murcko_scaffold(SMILES[i]) for i in idx} for name, idx in s.items()}
        assert not (scaf["train"] & scaf["test"]) and not (scaf["train"] & scaf["val"]) and not (scaf["val"] & scaf["test"])
    assert len({tuple(scaffold_split(SMILES, seed=s)["test"]) for s in range(6)}) > 1  # seeds matter


def test_kfold_tests_cover_everything_once():
    for scaffold in (False, True):
        arg = SMILES if scaffold else len(SMILES)
        tests = [kfold_split(arg, folds=4, fold=f, seed=1, scaffold=scaffold)["test"] for f in range(4)]
        assert sorted(i for t in tests for i in t) == list(range(len(SMILES)))
    with pytest.raises(ValueError):
        kfold_split(10, folds=2)
    with pytest.raises(ValueError):
        random_split(10, sizes=(0.5, 0.6, -0.1))
