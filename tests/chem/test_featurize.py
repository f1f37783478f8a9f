"""Featurisation: canonical, deterministic, OGB-compatible; invalid input is an error, never an empty graph."""
import random

import pytest
import torch

pytest.importorskip("rdkit")
from rdkit import Chem  # noqa: E402

from plstm_graph.chem import (  # noqa: E402
    ATOM_FEATURE_DIMS, BOND_FEATURE_DIMS, InvalidSmilesError, featurize_many, featurize_smiles, mol_to_dag,
    mols_to_dags, smiles_to_dag,
)
from plstm_graph.graph import attach_schedules  # noqa: E402

SAME = [
    ("OCC", "CCO"),
    ("c1ccccc1O", "Oc1ccccc1"),
    ("C1=CC=CC=C1C(=O)[O-]", "[O-]C(=O)c1ccccc1"),  # Kekulé vs aromatic, charged
    ("C[C@H](N)O", "N[C@@H](C)O"),  # same stereocentre written from another atom
    ("F/C=C/F", "F\\C=C\\F"),  # same double-bond stereo
    ("[NH3+]CC(=O)[O-]", "[O-]C(=O)C[NH3+]"),  # zwitterion
    ("[Na+].[Cl-]", "[Cl-].[Na+]"),  # fragments in another order
    ("OC(=O)c1ccccc1OC(C)=O", "CC(=O)Oc1ccccc1C(O)=O"),  # aspirin
]


def _equal(a, b):
    return torch.equal(a.x, b.x) and torch.equal(a.edge_index, b.edge_index) and torch.equal(a.edge_attr, b.edge_attr)


@pytest.mark.parametrize("a,b", SAME)
def test_two_writings_give_identical_graph_and_dag(a, b):
    ga, gb = featurize_smiles(a), featurize_smiles(b)
    assert _equal(ga, gb)
    da, db = mol_to_dag(ga), mol_to_dag(gb)
    assert sorted(da.keys()) == sorted(db.keys())
    for k in da.keys():
        va, vb = da[k], db[k]
        assert (torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb), k


@pytest.mark.parametrize("smiles", ["CC(=O)Oc1ccccc1C(=O)O", "C[C@@H]1CC[C@H](O)CC1", "O=[N+]([O-])c1ccc(Cl)cc1",
                                    "CN1C=NC2=C1C(=O)N(C(=O)N2C)C", "C/C=C\\CC(Br)C#N"])
def test_random_atom_orders_give_identical_graph(smiles):
    ref = featurize_smiles(smiles)
    mol = Chem.MolFromSmiles(smiles)
    rng = random.Random(0)
    for _ in range(5):
        perm = list(range(mol.GetNumAtoms()))
        rng.shuffle(perm)
        shuffled = Chem.MolToSmiles(Chem.RenumberAtoms(mol, perm), canonical=False)
        assert _equal(featurize_smiles(shuffled), ref), shuffled


def test_enantiomers_differ():
    assert not _equal(featurize_smiles("C[C@H](N)O"), featurize_smiles("C[C@@H](N)O"))


def test_matches_ogb_smiles2graph_up_to_renumbering():
    from ogb.utils import smiles2graph

    for s in ["CCO", "c1ccccc1O", "C[N+](C)(C)CC(=O)[O-]", "ClC(Cl)(Cl)Br"]:
        ours = featurize_smiles(s)
        ogb = smiles2graph(ours.canonical_smiles)  # same parse; our ids are canonical ranks of it
        mol = Chem.MolFromSmiles(ours.canonical_smiles)
        ranks = list(Chem.CanonicalRankAtoms(mol, breakTies=True))
        x_ogb = torch.as_tensor(ogb["node_feat"])
        x_perm = torch.empty_like(x_ogb)
        x_perm[torch.tensor(ranks)] = x_ogb
        # chirality tags are relative to neighbour order, so compare every other atom feature exactly
        keep = [0, 2, 3, 4, 5, 6, 7, 8]
        assert torch.equal(ours.x[:, keep], x_perm[:, keep])
        bonds_ogb = {}
        for (u, w), f in zip(ogb["edge_index"].T.tolist(), ogb["edge_feat"].tolist()):
            bonds_ogb[(min(ranks[u], ranks[w]), max(ranks[u], ranks[w]))] = f
        ours_bonds = {tuple(e): f for e, f in zip(ours.edge_index.t().tolist(), ours.edge_attr.tolist())}
        assert ours_bonds == bonds_ogb
        assert ours.edge_index.size(1) * 2 == ogb["edge_index"].shape[1]


def test_feature_ranges_and_orientation():
    g = featurize_smiles("CC(=O)Nc1ccc(O)cc1")
    assert g.x.shape[1] == len(ATOM_FEATURE_DIMS) and g.edge_attr.shape[1] == len(BOND_FEATURE_DIMS)
    assert (g.x < torch.tensor(ATOM_FEATURE_DIMS)).all() and (g.x >= 0).all()
    assert (g.edge_attr < torch.tensor(BOND_FEATURE_DIMS)).all()
    assert (g.edge_index[0] < g.edge_index[1]).all()  # low canonical rank -> high rank: a DAG
    cols = g.edge_index.t().tolist()
    assert cols == sorted(cols)


@pytest.mark.parametrize("smiles", ["C", "[Na+]", "O", "[He]"])
def test_single_atom(smiles):
    d = smiles_to_dag(smiles, y=[1.5])
    assert d.num_nodes == 1 and d.edge_index.shape == (2, 0) and d.edge_attr.shape == (0, 3)
    assert d.P_line_index.shape == (2, 0) and d.P_node_level.tolist() == [0]
    assert d.y.tolist() == [[1.5]]


@pytest.mark.parametrize("bad", ["", "   ", "C1CC", "not-a-smiles", "c1cccc1", "C(C)(C)(C)(C)C"])
def test_invalid_smiles_raise(bad):
    with pytest.raises(InvalidSmilesError):
        featurize_smiles(bad)


def test_featurize_many_reports_positions():
    graphs, invalid = featurize_many(["CCO", "xx", "C", "C1CC"])
    assert [g is None for g in graphs] == [False, True, False, True]
    assert [i for i, _ in invalid] == [1, 3]


def test_chunked_compilation_equals_one_by_one():
    smiles = ["CCO", "C", "c1ccccc1O", "[Na+].[Cl-]", "CC(C)(C)c1ccc(O)cc1", "C1CC2CCC1C2", "N#N", "CC(=O)O"]
    mols = [featurize_smiles(s) for s in smiles]
    for chunk in (1, 3, 100):
        dags = mols_to_dags(mols, chunk_size=chunk)
        for m, d in zip(mols, dags):
            from torch_geometric.data import Data

            ref = attach_schedules(Data(x=m.x, edge_index=m.edge_index, edge_attr=m.edge_attr, num_nodes=m.num_nodes))
            assert sorted(ref.keys()) == sorted(d.keys())
            for k in ref.keys():
                if isinstance(ref[k], torch.Tensor):
                    assert torch.equal(ref[k], d[k]), (chunk, k)


def test_feature_vocabulary_equals_ogb_on_many_atoms():
    from ogb.utils.features import atom_to_feature_vector, bond_to_feature_vector, get_atom_feature_dims, get_bond_feature_dims

    from plstm_graph.chem.featurize import atom_features, bond_features

    assert list(ATOM_FEATURE_DIMS) == get_atom_feature_dims() and list(BOND_FEATURE_DIMS) == get_bond_feature_dims()
    smiles = ["[2H]C([3H])Cl", "[Fe+3].[O-2]", "C[S+](C)[O-]", "[CH2]C", "F[I-](F)(F)(F)(F)F", "*CC",
              "C1=CC=CC=C1/C=C/C(=O)[O-]", "C[C@@H]1CCC[C@H](N)C1", "[Xe]", "O=S(=O)(O)O", "c1ccc2[nH]ccc2c1",
              "C=C=C", "[Cu+2]", "C[N+](C)(C)C", "[Og]", "[Sc]"]
    for s in smiles:
        mol = Chem.MolFromSmiles(s)
        for a in mol.GetAtoms():
            assert atom_features(a) == atom_to_feature_vector(a), (s, a.GetSymbol())
        for b in mol.GetBonds():
            assert bond_features(b) == bond_to_feature_vector(b), s
