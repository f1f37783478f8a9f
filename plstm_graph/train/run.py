"""One training run end to end, and loading a trained model for prediction.

``train_run(TrainConfig(...))`` loads the data set, featurises it (cached), splits it (seeded), trains with
Lightning (AdamW, linear warm-up then cosine decay, gradient clipping, a moving average of the weights, early
stopping on the validation metric, best checkpoint, CSV logs), evaluates the best model (``select="last"``: the
weights after the last epoch) on validation and test, and writes into ``config.out``:

* ``metrics.json``: ``{"test": {...}, "val": {...}, "config": {...}, "task", "targets", "epochs_run",
  "epoch_seconds", "num_molecules", "invalid_smiles"}``;
* ``model.pt``: model weights, constructor arguments, target scaling, task, target names, featurisation
  hash (loaded by :func:`load_trained`);
* ``split.json``: the split as table row indices and SMILES;
* ``checkpoints/`` and ``logs/`` (Lightning checkpoint and CSV log).
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["TrainConfig", "train_run", "load_trained", "predict_smiles", "TrainedModel", "UserInputError"]


class UserInputError(ValueError):
    """A mistake in the data or the configuration, found before training starts (the CLI prints it as one
    line)."""


@dataclass
class TrainConfig:
    """Everything a run needs; saved in ``metrics.json["config"]``."""

    dataset: Optional[str] = "freesolv"
    csv: Optional[str] = None
    smiles_column: Optional[str] = None
    target_columns: List[str] = field(default_factory=list)
    task: Optional[str] = None
    model: str = "plstm"
    split: str = "scaffold"
    split_sizes: Tuple[float, float, float] = (0.8, 0.1, 0.1)
    folds: int = 5
    fold: int = 0
    seed: int = 0
    init_seed: Optional[int] = None  # model initialisation, batch order, dropout; None: ``seed``
    epochs: int = 40
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    hidden: int = 64
    num_layers: int = 4
    num_heads: int = 4
    dropout: float = 0.1
    readout: str = "mean+sum"
    local_mix: Union[bool, str] = "gine"  # "gine": GIN's layer, "gin": GIN's stack, True: GELU term, False: none
    layer_scale: float = 0.01
    plstm_lr_scale: float = 0.3
    patience: int = 15
    warmup_epochs: int = 5
    ema_decay: float = 0.98
    grad_clip: float = 1.0
    select: str = "best"
    devices: int = 1
    accelerator: str = "auto"
    precision: Optional[str] = None
    num_workers: Optional[int] = None  # None: 4 when training on a GPU (at most the CPU count), else 0
    out: str = "runs/freesolv-plstm"
    cache_dir: Optional[str] = None
    max_molecules: Optional[int] = None
    progress: bool = True

    def validate(self) -> None:
        from plstm_graph.datasets.splits import SPLITS
        from plstm_graph.models.molecule import MODELS

        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of: {', '.join(MODELS)}")
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}; choose one of: {', '.join(SPLITS)}")
        for name in ("epochs", "batch_size", "hidden", "num_layers", "num_heads", "devices", "folds"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.init_seed is not None and int(self.init_seed) < 0:
            raise ValueError(f"--init-seed must be non-negative, got {self.init_seed}")
        if self.patience < 0 or (self.num_workers or 0) < 0 or self.warmup_epochs < 0:
            raise ValueError("--patience, --num-workers and --warmup-epochs must be non-negative")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if not (self.layer_scale >= 0 and np.isfinite(self.layer_scale)):
            raise ValueError(f"--layer-scale must be a non-negative number, got {self.layer_scale}")
        if not (self.plstm_lr_scale > 0 and np.isfinite(self.plstm_lr_scale)):
            raise ValueError(f"--plstm-lr-scale must be a positive number, got {self.plstm_lr_scale}")
        if not (self.grad_clip >= 0 and np.isfinite(self.grad_clip)):
            raise ValueError(f"--grad-clip must be a non-negative number, got {self.grad_clip}")
        if not (isinstance(self.local_mix, bool) or self.local_mix in ("gine", "gin", "mix", "off")):
            raise ValueError(f"--local-mix must be gine, gin, on or off, got {self.local_mix!r}")
        if self.select not in ("best", "last"):
            raise ValueError(f"--select must be best or last, got {self.select!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.hidden % self.num_heads:
            raise ValueError(f"--hidden ({self.hidden}) must be divisible by --heads ({self.num_heads})")
        if self.max_molecules is not None and self.max_molecules < 3:
            raise ValueError("--max-molecules must be at least 3")
        if self.task not in (None, "regression", "classification"):
            raise ValueError(f"--task must be regression or classification, got {self.task!r}")
        if self.csv is None and self.dataset is None:
            raise ValueError("give --dataset or --csv")
        if self.csv is not None and (not self.smiles_column or not self.target_columns):
            raise ValueError("--csv needs --smiles-column and at least one --target-column")


def _load_table(cfg: TrainConfig):
    from plstm_graph.datasets.molecules import load_csv, load_dataset

    if cfg.csv is not None:
        table = load_csv(cfg.csv, cfg.smiles_column, cfg.target_columns, task=cfg.task)
    else:
        table = load_dataset(cfg.dataset)
        if cfg.task is not None and cfg.task != table.task:
            raise ValueError(f"data set {cfg.dataset!r} is a {table.task} task, not {cfg.task}")
    return table


def _model_kwargs(cfg: TrainConfig, num_tasks: int) -> Dict:
    kwargs = dict(model=cfg.model, num_tasks=num_tasks, hidden=cfg.hidden, num_layers=cfg.num_layers,
                  num_heads=cfg.num_heads, dropout=cfg.dropout, readout=cfg.readout)
    if cfg.model == "plstm":
        kwargs["local_mix"] = cfg.local_mix if isinstance(cfg.local_mix, str) else bool(cfg.local_mix)
        kwargs["layer_scale"] = float(cfg.layer_scale) if cfg.layer_scale else None  # 0: no LayerScale
    return kwargs


def _scaler(task: str, y: np.ndarray) -> Tuple[List[float], List[float]]:
    if task != "regression":
        return [0.0] * y.shape[1], [1.0] * y.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(y, axis=0)
        std = np.nanstd(y, axis=0)
    mean = np.where(np.isfinite(mean), mean, 0.0)
    std = np.where(np.isfinite(std) & (std > 1e-8), std, 1.0)
    return mean.tolist(), std.tolist()


def _quiet_lightning() -> None:
    """Lightning's info lines (hardware, tips) and a dependency deprecation would bury our summary."""
    import logging

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    # validation metrics are computed on all-gathered predictions, identical on every rank
    warnings.filterwarnings("ignore", message=r".*sync_dist=True.*")
    warnings.filterwarnings("ignore", message=r".*all_gather is deprecated.*")


def _trainer(cfg: TrainConfig, out: Path, monitor: str, mode: str):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger

    _quiet_lightning()
    cuda = torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda")
    precision = cfg.precision or ("bf16-mixed" if cuda else "32-true")
    if cfg.select == "best":  # early stopping; the epoch with the best validation metric
        callbacks = [
            EarlyStopping(monitor=monitor, mode=mode, patience=cfg.patience),
            ModelCheckpoint(dirpath=str(out / "checkpoints"), filename="best", monitor=monitor, mode=mode,
                            save_top_k=1, save_last=False),
        ]
    else:  # every epoch of the schedule; the weights after the last one
        callbacks = [ModelCheckpoint(dirpath=str(out / "checkpoints"), filename="last", monitor=None, save_top_k=1)]
    if cfg.progress:
        callbacks.append(TQDMProgressBar(leave=False))
    strategy = "ddp" if cfg.devices > 1 else "auto"
    return pl.Trainer(
        max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=cfg.devices, strategy=strategy,
        precision=precision, callbacks=callbacks, logger=CSVLogger(str(out), name="logs", version=""),
        enable_progress_bar=cfg.progress, enable_model_summary=False, log_every_n_steps=1,
        deterministic=False, num_sanity_val_steps=0, gradient_clip_val=cfg.grad_clip or None,
    )


@torch.no_grad()
def _predict(module, graphs: list, batch_size: int = 256) -> np.ndarray:
    from torch_geometric.loader import DataLoader

    module.eval()
    device = next(module.parameters()).device
    from plstm_graph.graph import prepare_batch

    outs = [module.predict_batch(prepare_batch(b, device, keys=module.eval_model())).float().cpu()
            for b in DataLoader(graphs, batch_size=batch_size)]
    return torch.cat(outs).numpy() if outs else np.zeros((0, module.target_mean.size(1)))


def train_run(cfg: TrainConfig) -> Dict:
    """Train one model; returns the content of ``metrics.json`` (see the module docstring)."""
    import lightning.pytorch as pl

    from plstm_graph.chem import featurization_hash
    from plstm_graph.datasets.molecules import build_graphs
    from plstm_graph.datasets.splits import make_split

    from .lightning import MoleculeDataModule, MoleculeLitModule
    from .metrics import compute_metrics, primary_metric

    try:
        cfg.validate()
        table = _load_table(cfg)
    except (ValueError, FileNotFoundError) as err:
        raise UserInputError(str(err)) from None
    out = Path(cfg.out)
    mg = build_graphs(table, cache_dir=cfg.cache_dir, progress=cfg.progress)
    graphs, rows = mg.graphs, mg.rows
    if cfg.max_molecules is not None:
        graphs, rows = graphs[:cfg.max_molecules], rows[:cfg.max_molecules]
    if len(graphs) < 3:
        raise UserInputError(f"only {len(graphs)} valid molecules; need at least 3 to split into train/val/test")
    smiles = [table.smiles[r] for r in rows]
    try:
        split = make_split(cfg.split, smiles, seed=cfg.seed, sizes=cfg.split_sizes, folds=cfg.folds, fold=cfg.fold)
    except ValueError as err:
        raise UserInputError(str(err)) from None
    for name in ("train", "val", "test"):
        if not split[name]:
            raise UserInputError(f"the {cfg.split} split left the {name} set empty ({len(graphs)} molecules); "
                             "use more molecules or another split")
    parts = {k: [graphs[i] for i in v] for k, v in split.items()}
    y_train = table.targets[[rows[i] for i in split["train"]]]
    mean, std = _scaler(table.task, y_train)

    # the split above follows cfg.seed; the model's initial weights, batch order and dropout follow init_seed
    init_seed = cfg.seed if cfg.init_seed is None else int(cfg.init_seed)
    pl.seed_everything(init_seed, workers=True, verbose=False)
    model_kwargs = _model_kwargs(cfg, num_tasks=len(table.target_names))
    module = MoleculeLitModule(model_kwargs, table.task, mean, std, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                               ema_decay=cfg.ema_decay,
                               plstm_lr_scale=cfg.plstm_lr_scale if cfg.model == "plstm" else 1.0)
    name, mode = primary_metric(table.task)
    out.mkdir(parents=True, exist_ok=True)
    trainer = _trainer(cfg, out, f"val_{name}", mode)
    workers = cfg.num_workers
    if workers is None:  # GPU steps are short enough for the host work of a batch to matter; on CPU they are not
        # 4 (was 2): headroom for each batch's collation, schedules, Triton plans and packing; on the H200 host
        # 2 and 4 workers measured alike (README, GPU throughput), so this is not a measured gain
        workers = min(4, os.cpu_count() or 1) if trainer.strategy.root_device.type == "cuda" else 0
    data = MoleculeDataModule(parts["train"], parts["val"], parts["test"], batch_size=cfg.batch_size,
                              num_workers=workers, seed=init_seed)
    trainer.fit(module, datamodule=data)
    if not trainer.is_global_zero:  # DDP: rank 0 evaluates and writes
        return {}

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best and os.path.exists(best):
        state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
    module = module.to("cpu").float()
    result = {}
    for part in ("val", "test"):
        pred = _predict(module, parts[part])
        true = table.targets[[rows[i] for i in split[part]]]
        result[part] = compute_metrics(table.task, true, pred)
    config = dataclasses.asdict(cfg)
    result.update({
        "config": config, "task": table.task, "targets": table.target_names, "dataset": table.name,
        "epochs_run": int(trainer.current_epoch), "epoch_seconds": [round(s, 4) for s in module.epoch_seconds],
        "num_molecules": {k: len(v) for k, v in split.items()},
        "invalid_smiles": [{"line": r, "smiles": s, "reason": m} for r, s, m in mg.invalid],
        "featurization": featurization_hash(),
    })
    torch.save({
        "model_kwargs": model_kwargs, "state_dict": module.eval_model().state_dict(), "task": table.task,
        "targets": table.target_names, "target_mean": mean, "target_std": std,
        "featurization": featurization_hash(), "config": config,
    }, out / "model.pt")
    with open(out / "split.json", "w") as f:
        json.dump({"kind": cfg.split, "seed": cfg.seed, "sizes": list(cfg.split_sizes), "folds": cfg.folds,
                   "fold": cfg.fold,
                   **{k: {"rows": [rows[i] for i in v], "lines": [table.row_numbers[rows[i]] for i in v],
                          "smiles": [smiles[i] for i in v]} for k, v in split.items()}}, f, indent=1)
    with open(out / "metrics.json", "w") as f:
        json.dump(result, f, indent=2)
    return result


@dataclass
class TrainedModel:
    """A model loaded from a run directory: ``predict(smiles)`` -> ``([M, T] array with NaN rows for invalid
    SMILES, invalid positions)``."""

    model: torch.nn.Module
    task: str
    targets: List[str]
    target_mean: torch.Tensor
    target_std: torch.Tensor
    featurization: str

    @torch.no_grad()
    def predict(self, smiles: Sequence[str], batch_size: int = 128) -> Tuple[np.ndarray, List[Tuple[int, str]]]:
        from torch_geometric.loader import DataLoader

        from plstm_graph.chem import featurize_many, mols_to_dags

        mols, invalid = featurize_many(list(smiles))
        ok = [i for i, m in enumerate(mols) if m is not None]
        out = np.full((len(smiles), len(self.targets)), np.nan)
        if ok:
            # one molecule per compile chunk: a molecule's tensors never depend on its neighbours in the input
            graphs = mols_to_dags([mols[i] for i in ok], chunk_size=1)
            from plstm_graph.graph import prepare_batch

            preds = []
            device = next(self.model.parameters()).device
            for b in DataLoader(graphs, batch_size=batch_size):
                y = self.model(prepare_batch(b, device, keys=self.model)).float().cpu()
                preds.append(y * self.target_std + self.target_mean if self.task == "regression" else torch.sigmoid(y))
            out[ok] = torch.cat(preds).numpy()
        return out, invalid


def load_trained(model_dir: str) -> TrainedModel:
    """Load ``model_dir/model.pt`` written by :func:`train_run`.

    Raises:
        FileNotFoundError: no such directory or no ``model.pt`` in it.
    """
    from plstm_graph.chem import featurization_hash
    from plstm_graph.models.molecule import MoleculeModel

    path = Path(model_dir) / "model.pt"
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    if not path.is_file():
        raise FileNotFoundError(f"no model.pt in {model_dir}; train one with: plstm-graph train --out {model_dir}")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    kwargs = dict(blob["model_kwargs"])
    if kwargs.get("model") == "plstm":
        # saved before these options existed: no local term, no scale on the pLSTM layers
        kwargs.setdefault("local_mix", False)
        kwargs.setdefault("layer_scale", None)
    model = MoleculeModel(**kwargs)
    model.load_state_dict(blob["state_dict"])
    model.eval()
    if blob.get("featurization") != featurization_hash():
        warnings.warn(f"{model_dir} was trained with featurisation {blob.get('featurization')}, this install uses "
                      f"{featurization_hash()} (another RDKit or plstm-graph version); predictions may differ",
                      stacklevel=2)
    return TrainedModel(model=model, task=blob["task"], targets=list(blob["targets"]),
                        target_mean=torch.tensor(blob["target_mean"]).view(1, -1),
                        target_std=torch.tensor(blob["target_std"]).view(1, -1), featurization=blob["featurization"])


def predict_smiles(model_dir: str, smiles: Sequence[str]) -> Tuple[np.ndarray, List[Tuple[int, str]], List[str]]:
    """``(predictions [M, T], invalid (position, reason), target names)`` of a trained run directory."""
    tm = load_trained(model_dir)
    pred, invalid = tm.predict(smiles)
    return pred, invalid, tm.targets
