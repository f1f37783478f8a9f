"""SMILES -> graph record -> canonically oriented DAG.

Three small steps, each deterministic:

1. :func:`featurize_smiles` parses a SMILES string with RDKit, rewrites it as RDKit's canonical SMILES and
   parses that again, so the molecule object no longer depends on how the input was written. Atoms are then
   renumbered by RDKit's canonical atom ranks (``Chem.CanonicalRankAtoms``, stereo included, ties broken),
   and the OGB atom (9 integer features) and bond (3 integer features) vocabulary is read off
   (the vocabulary of ``ogb.utils.smiles2graph``, re-stated in :func:`atom_features` /
   :func:`bond_features` so the ``ogb`` package is not imported). The result is a :class:`MolGraph` record.
2. Every bond ``{u, w}`` becomes one directed edge from the lower canonical rank to the higher one.
   Because atom ids *are* canonical ranks after step 1, this is ``min(u, w) -> max(u, w)``: an acyclic
   orientation whose only source nodes are local rank minima. Edges are sorted by ``(tail, head)``.
3. :func:`mol_to_dag` compiles the P and D schedules (forward and reversed) with
   :func:`plstm_graph.graph.attach_schedules` and returns a :class:`~plstm_graph.graph.DAGData`.

So ``"OCC"`` and ``"CCO"`` give bit-identical tensors. Invalid input raises :class:`InvalidSmilesError`;
it is never turned into an empty molecule (PyG's ``from_smiles`` does that silently).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "ATOM_FEATURE_DIMS",
    "BOND_FEATURE_DIMS",
    "FEATURIZATION_VERSION",
    "InvalidSmilesError",
    "MolGraph",
    "featurization_hash",
    "atom_features",
    "bond_features",
    "featurize_smiles",
    "mol_to_dag",
    "mols_to_dags",
    "smiles_to_dag",
    "featurize_many",
]

# Bump when anything below changes what a SMILES string turns into; it is part of every cache key.
FEATURIZATION_VERSION = "1"

# OGB's vocabulary sizes (``ogb.utils.features.get_atom_feature_dims`` / ``get_bond_feature_dims``).
ATOM_FEATURE_DIMS: Tuple[int, ...] = (119, 5, 12, 12, 10, 6, 6, 2, 2)
BOND_FEATURE_DIMS: Tuple[int, ...] = (5, 6, 2)

_SCHEDULE_MODES = ("P", "D")


class InvalidSmilesError(ValueError):
    """A SMILES string RDKit cannot parse (or that parses to a molecule without atoms)."""


@dataclass(frozen=True)
class MolGraph:
    """A molecule as a canonically numbered graph record (featurisation output, no model state).

    Attributes:
        smiles: the input string, as given.
        canonical_smiles: RDKit's canonical SMILES of the input.
        x: ``[N, 9]`` int64 OGB atom features, row ``i`` = atom of canonical rank ``i``.
        edge_index: ``[2, E]`` int64, one column per bond, ``edge_index[0] < edge_index[1]`` (low rank ->
            high rank), sorted by (tail, head).
        edge_attr: ``[E, 3]`` int64 OGB bond features of those bonds.
    """

    smiles: str
    canonical_smiles: str
    x: torch.Tensor
    edge_index: torch.Tensor
    edge_attr: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return int(self.x.size(0))

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.size(1))


def featurization_hash() -> str:
    """A short hash of everything that decides the featurisation (used in cache keys)."""
    from rdkit import rdBase

    text = "|".join(
        [FEATURIZATION_VERSION, rdBase.rdkitVersion, repr(ATOM_FEATURE_DIMS), repr(BOND_FEATURE_DIMS),
         repr(_SCHEDULE_MODES)]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _parse(smiles: str):
    from rdkit import Chem, RDLogger

    if not isinstance(smiles, str) or not smiles.strip():
        raise InvalidSmilesError(f"empty SMILES {smiles!r}")
    RDLogger.DisableLog("rdApp.*")  # RDKit prints parse errors to stderr; we raise them instead
    try:
        mol = Chem.MolFromSmiles(smiles.strip())
        if mol is None:
            raise InvalidSmilesError(f"RDKit cannot parse SMILES {smiles!r}")
        if mol.GetNumAtoms() == 0:
            raise InvalidSmilesError(f"SMILES {smiles!r} has no atoms")
        canonical = Chem.MolToSmiles(mol)
        mol = Chem.MolFromSmiles(canonical)
        if mol is None:  # pragma: no cover - RDKit round-trip failure, rare
            raise InvalidSmilesError(f"RDKit cannot re-read its own canonical SMILES {canonical!r} of {smiles!r}")
    finally:
        RDLogger.EnableLog("rdApp.*")
    return mol, canonical


# OGB's vocabulary (``ogb.utils.features.allowable_features``), re-stated so that featurising never imports
# the ``ogb`` package: its import starts a PyPI version check (a network call) in a background thread.
# A value outside a list maps to the list's last slot ("misc"), as in OGB. Tested against OGB's own code.
_CHIRALITY = {"CHI_UNSPECIFIED": 0, "CHI_TETRAHEDRAL_CW": 1, "CHI_TETRAHEDRAL_CCW": 2, "CHI_OTHER": 3}
_HYBRIDIZATION = {"SP": 0, "SP2": 1, "SP3": 2, "SP3D": 3, "SP3D2": 4}
_BOND_TYPE = {"SINGLE": 0, "DOUBLE": 1, "TRIPLE": 2, "AROMATIC": 3}
_BOND_STEREO = {"STEREONONE": 0, "STEREOZ": 1, "STEREOE": 2, "STEREOCIS": 3, "STEREOTRANS": 4, "STEREOANY": 5}


def _slot(value: int, low: int, high: int) -> int:
    """Index of ``value`` in ``[low, ..., high, misc]``."""
    return value - low if low <= value <= high else high - low + 1


def atom_features(atom) -> List[int]:
    """OGB's 9 atom features of an RDKit atom: atomic number, chirality tag, total degree, formal charge,
    total H count, radical electrons, hybridisation, aromatic, in ring (vocabulary sizes
    :data:`ATOM_FEATURE_DIMS`)."""
    return [
        _slot(atom.GetAtomicNum(), 1, 118),
        _CHIRALITY.get(str(atom.GetChiralTag()), 4),
        _slot(atom.GetTotalDegree(), 0, 10),
        _slot(atom.GetFormalCharge(), -5, 5),
        _slot(atom.GetTotalNumHs(), 0, 8),
        _slot(atom.GetNumRadicalElectrons(), 0, 4),
        _HYBRIDIZATION.get(str(atom.GetHybridization()), 5),
        int(atom.GetIsAromatic()),
        int(atom.IsInRing()),
    ]


def bond_features(bond) -> List[int]:
    """OGB's 3 bond features of an RDKit bond: type, stereo, conjugated (sizes :data:`BOND_FEATURE_DIMS`)."""
    return [
        _BOND_TYPE.get(str(bond.GetBondType()), 4),
        _BOND_STEREO[str(bond.GetStereo())],
        int(bond.GetIsConjugated()),
    ]


def featurize_smiles(smiles: str) -> MolGraph:
    """Parse ``smiles`` into a canonically numbered :class:`MolGraph` with OGB features.

    Raises:
        InvalidSmilesError: unparsable or empty input.

    Example:
        >>> g = featurize_smiles("OCC")
        >>> h = featurize_smiles("CCO")
        >>> bool(torch.equal(g.x, h.x) and torch.equal(g.edge_index, h.edge_index))
        True
        >>> g.edge_index.tolist()
        [[0, 1], [2, 2]]
    """
    from rdkit import Chem

    mol, canonical = _parse(smiles)
    ranks = list(Chem.CanonicalRankAtoms(mol, breakTies=True, includeChirality=True))
    order = [0] * len(ranks)  # order[new id] = old id
    for old, r in enumerate(ranks):
        order[r] = old
    mol = Chem.RenumberAtoms(mol, order)

    x = torch.tensor([atom_features(a) for a in mol.GetAtoms()], dtype=torch.long).view(-1, 9)
    pairs, feats = [], []
    for bond in mol.GetBonds():
        u, w = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        pairs.append((min(u, w), max(u, w)))
        feats.append(bond_features(bond))
    if pairs:
        perm = sorted(range(len(pairs)), key=lambda i: pairs[i])
        edge_index = torch.tensor([pairs[i] for i in perm], dtype=torch.long).t().contiguous()
        edge_attr = torch.tensor([feats[i] for i in perm], dtype=torch.long).view(-1, 3)
    else:  # single atom / only isolated atoms
        edge_index = torch.zeros(2, 0, dtype=torch.long)
        edge_attr = torch.zeros(0, 3, dtype=torch.long)
    return MolGraph(smiles=smiles, canonical_smiles=canonical, x=x, edge_index=edge_index, edge_attr=edge_attr)


def mols_to_dags(graphs: Sequence[MolGraph], chunk_size: int = 512) -> list:
    """Compile many :class:`MolGraph` records into :class:`~plstm_graph.graph.DAGData` (P and D, forward and
    reversed), ``chunk_size`` molecules per :func:`~plstm_graph.graph.attach_schedules` call.

    The schedules are compiled on the disjoint union of a chunk and cut back into molecules. Every rule of
    ``compile_dag`` is local to a connected component and keeps the relative order of edge ids, so each
    molecule's slice is exactly what compiling it alone gives (tested); one call per chunk instead of four
    per molecule makes featurising B3DB take seconds instead of minutes.
    """
    from torch_geometric.data import Data

    from plstm_graph.graph import DAGData, attach_schedules

    out = []
    for start in range(0, len(graphs), chunk_size):
        chunk = graphs[start:start + chunk_size]
        n_nodes = torch.tensor([g.num_nodes for g in chunk])
        n_edges = torch.tensor([g.num_edges for g in chunk])
        node_off = torch.cumsum(n_nodes, 0) - n_nodes
        edge_off = torch.cumsum(n_edges, 0) - n_edges
        ei = torch.cat([g.edge_index + int(o) for g, o in zip(chunk, node_off)], dim=1)
        union = Data(x=torch.cat([g.x for g in chunk]), edge_index=ei, num_nodes=int(n_nodes.sum()))
        union = attach_schedules(union, modes=_SCHEDULE_MODES, reverse=True)
        mol_of_edge = torch.repeat_interleave(torch.arange(len(chunk)), n_edges)
        cut = {}
        for key, value in union.items():
            if key.endswith("_line_index"):
                owner = mol_of_edge[value[0]]  # a line edge belongs to the molecule of its edges
                order = torch.argsort(owner, stable=True)
                counts = torch.bincount(owner, minlength=len(chunk)).tolist()
                cut[key] = [piece - int(o) for piece, o in zip(torch.split(value[:, order], counts, dim=1), edge_off)]
            elif key.endswith("_node_level"):
                cut[key] = list(torch.split(value, n_nodes.tolist()))
        for i, g in enumerate(chunk):
            fields = {key: pieces[i].contiguous() for key, pieces in cut.items()}
            out.append(DAGData(x=g.x, edge_index=g.edge_index, edge_attr=g.edge_attr, num_nodes=g.num_nodes, **fields))
    return out


def mol_to_dag(graph: MolGraph, y: Optional[torch.Tensor] = None):
    """Compile a :class:`MolGraph` into a :class:`~plstm_graph.graph.DAGData` (P and D, forward and reversed).

    Shapes:
        x: ``[N, 9]`` long, edge_index: ``[2, E]`` long (low rank -> high rank), edge_attr: ``[E, 3]`` long,
        ``{P,D,P_rev,D_rev}_line_index``: ``[2, L]``, ``{...}_node_level``: ``[N]``,
        y: ``[1, T]`` float (NaN = missing label) when given.

    Example:
        >>> d = mol_to_dag(featurize_smiles("c1ccccc1O"))
        >>> d.num_nodes, d.edge_index.size(1), d.schedule("P").num_levels > 1
        (7, 7, True)
    """
    out = mols_to_dags([graph])[0]
    if y is not None:
        out.y = torch.as_tensor(y, dtype=torch.float32).view(1, -1)
    return out


def smiles_to_dag(smiles: str, y: Optional[Sequence[float]] = None):
    """``mol_to_dag(featurize_smiles(smiles), y)``; raises :class:`InvalidSmilesError` on bad input.

    Example:
        >>> d = smiles_to_dag("[Na+]")
        >>> d.num_nodes, d.edge_index.shape
        (1, torch.Size([2, 0]))
    """
    return mol_to_dag(featurize_smiles(smiles), None if y is None else torch.as_tensor(np.asarray(y, dtype=np.float32)))


def featurize_many(smiles: Sequence[str], progress: bool = False) -> Tuple[List[Optional[MolGraph]], List[Tuple[int, str]]]:
    """Featurise a list; returns ``(graphs, invalid)`` with ``graphs[i] = None`` for every invalid entry and
    ``invalid`` a list of ``(position, message)``, in input order. Nothing is dropped silently: the caller
    decides how to report positions (e.g. as CSV row numbers)."""
    from tqdm.auto import tqdm

    graphs: List[Optional[MolGraph]] = []
    invalid: List[Tuple[int, str]] = []
    it = tqdm(smiles, desc="featurising", unit="mol", disable=not progress, leave=False)
    for i, s in enumerate(it):
        try:
            graphs.append(featurize_smiles(s))
        except InvalidSmilesError as err:
            graphs.append(None)
            invalid.append((i, str(err)))
    return graphs, invalid
