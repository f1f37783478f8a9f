"""Seeded data splits: random, scaffold (Bemis-Murcko) and k-fold (random or scaffold-grouped).

Every function returns ``{"train": [...], "val": [...], "test": [...]}`` of positions into the list it was
given, disjoint, covering every position, each sorted. The same arguments always give the same split.

Scaffold split (the "balanced" variant of chemprop): molecules are grouped by their Bemis-Murcko scaffold
(generic SMILES of ring systems + linkers, stereo ignored; acyclic molecules share the empty scaffold). Groups
bigger than half the validation or test size go first (so a huge group lands in train), the rest in a
seeded random order; each group is put whole into train until it is full, then val, then test. So no
scaffold is shared between train and test, and different seeds give different splits.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

__all__ = ["SPLITS", "random_split", "scaffold_split", "kfold_split", "murcko_scaffold", "make_split"]

SPLITS = ("random", "scaffold", "kfold", "scaffold-kfold")


def _check_sizes(sizes: Sequence[float]) -> Tuple[float, float, float]:
    if len(sizes) != 3 or any(not np.isfinite(s) or s < 0 for s in sizes) or abs(sum(sizes) - 1.0) > 1e-6:
        raise ValueError(f"split sizes must be three non-negative fractions summing to 1, got {tuple(sizes)}")
    return tuple(float(s) for s in sizes)  # type: ignore[return-value]


def _result(assign: np.ndarray) -> Dict[str, List[int]]:
    return {name: np.flatnonzero(assign == k).tolist() for k, name in enumerate(("train", "val", "test"))}


def random_split(n: int, sizes: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> Dict[str, List[int]]:
    """Random split of ``n`` items.

    Example:
        >>> s = random_split(10, seed=0)
        >>> [len(s[k]) for k in ("train", "val", "test")]
        [8, 1, 1]
    """
    f_train, f_val, _ = _check_sizes(sizes)
    perm = np.random.default_rng(seed).permutation(n)
    n_train, n_val = int(round(f_train * n)), int(round(f_val * n))
    assign = np.full(n, 2)
    assign[perm[:n_train]] = 0
    assign[perm[n_train:n_train + n_val]] = 1
    return _result(assign)


def murcko_scaffold(smiles: str) -> str:
    """Bemis-Murcko scaffold SMILES (``""`` for acyclic molecules and for unparsable input)."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem.Scaffolds import MurckoScaffold

    RDLogger.DisableLog("rdApp.*")
    try:
        mol = Chem.MolFromSmiles(smiles)
    finally:
        RDLogger.EnableLog("rdApp.*")
    if mol is None:
        return ""
    return MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=False)


def _scaffold_groups(smiles: Sequence[str]) -> List[List[int]]:
    groups: Dict[str, List[int]] = {}
    for i, s in enumerate(smiles):
        groups.setdefault(murcko_scaffold(s), []).append(i)
    return list(groups.values())


def scaffold_split(smiles: Sequence[str], sizes: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> Dict[str, List[int]]:
    """Balanced Bemis-Murcko scaffold split (see the module docstring).

    Example:
        >>> s = scaffold_split(["c1ccccc1C", "c1ccccc1O", "C1CC1N", "CCO", "CCN"], sizes=(0.6, 0.2, 0.2))
        >>> sorted(i for v in s.values() for i in v)
        [0, 1, 2, 3, 4]
        >>> {0, 1} <= set(s["train"]) or {0, 1} <= set(s["val"]) or {0, 1} <= set(s["test"])  # one scaffold, one set
        True
    """
    f_train, f_val, _ = _check_sizes(sizes)
    n = len(smiles)
    n_train, n_val = f_train * n, f_val * n
    n_test = n - n_train - n_val
    groups = _scaffold_groups(smiles)
    rng = np.random.default_rng(seed)
    big = [g for g in groups if len(g) > n_val / 2 or len(g) > n_test / 2]
    small = [g for g in groups if not (len(g) > n_val / 2 or len(g) > n_test / 2)]
    rng.shuffle(big)
    rng.shuffle(small)
    assign = np.full(n, 2)
    count = [0, 0]
    for g in big + small:
        if count[0] + len(g) <= n_train:
            assign[g], count[0] = 0, count[0] + len(g)
        elif count[1] + len(g) <= n_val:
            assign[g], count[1] = 1, count[1] + len(g)
    return _result(assign)


def kfold_split(n_or_smiles, folds: int = 5, fold: int = 0, seed: int = 0, scaffold: bool = False) -> Dict[str, List[int]]:
    """k-fold cross-validation: fold ``fold`` is the test set, fold ``fold + 1 (mod k)`` validation, the rest train.

    With ``scaffold=True`` (pass SMILES) whole scaffold groups are dealt to the folds (largest first, each to
    the currently smallest fold, seeded tie order), so no scaffold crosses folds.

    Example:
        >>> tests = [kfold_split(10, folds=5, fold=f)["test"] for f in range(5)]
        >>> sorted(i for t in tests for i in t) == list(range(10))
        True
    """
    if not isinstance(folds, int) or folds < 3:
        raise ValueError(f"k-fold needs at least 3 folds (train, val, test), got {folds}")
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in [0, {folds}), got {fold}")
    rng = np.random.default_rng(seed)
    if scaffold:
        smiles = list(n_or_smiles)
        n = len(smiles)
        groups = _scaffold_groups(smiles)
        order = rng.permutation(len(groups))
        groups = sorted((groups[i] for i in order), key=len, reverse=True)  # stable: seeded order among equals
        fold_of = np.zeros(n, dtype=np.int64)
        load = np.zeros(folds, dtype=np.int64)
        for g in groups:
            k = int(np.argmin(load))
            fold_of[g] = k
            load[k] += len(g)
    else:
        n = int(n_or_smiles) if not isinstance(n_or_smiles, (list, tuple)) else len(n_or_smiles)
        fold_of = np.empty(n, dtype=np.int64)
        fold_of[rng.permutation(n)] = np.arange(n) % folds
    assign = np.zeros(n, dtype=np.int64)
    assign[fold_of == (fold + 1) % folds] = 1
    assign[fold_of == fold] = 2
    return _result(assign)


def make_split(kind: str, smiles: Sequence[str], seed: int = 0, sizes: Sequence[float] = (0.8, 0.1, 0.1),
               folds: int = 5, fold: int = 0) -> Dict[str, List[int]]:
    """Dispatch on ``kind`` in :data:`SPLITS`."""
    if kind == "random":
        return random_split(len(smiles), sizes, seed)
    if kind == "scaffold":
        return scaffold_split(smiles, sizes, seed)
    if kind == "kfold":
        return kfold_split(len(smiles), folds, fold, seed)
    if kind == "scaffold-kfold":
        return kfold_split(list(smiles), folds, fold, seed, scaffold=True)
    raise ValueError(f"unknown split {kind!r}; choose one of: {', '.join(SPLITS)}")
