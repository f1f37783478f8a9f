"""Chemistry: RDKit SMILES -> OGB-featurised graph record -> canonically oriented DAG.

The only floor of the package (with ``datasets`` and ``train`` above it) that imports RDKit; it is
imported lazily, so ``import plstm_graph.chem`` itself needs only torch.
"""
from .featurize import (
    ATOM_FEATURE_DIMS,
    BOND_FEATURE_DIMS,
    FEATURIZATION_VERSION,
    InvalidSmilesError,
    MolGraph,
    featurization_hash,
    featurize_many,
    featurize_smiles,
    mol_to_dag,
    mols_to_dags,
    smiles_to_dag,
)

__all__ = [
    "ATOM_FEATURE_DIMS", "BOND_FEATURE_DIMS", "FEATURIZATION_VERSION", "InvalidSmilesError", "MolGraph",
    "featurization_hash", "featurize_many", "featurize_smiles", "mol_to_dag", "mols_to_dags", "smiles_to_dag",
]
