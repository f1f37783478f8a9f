"""Lightning wrappers: :class:`MoleculeLitModule` (loss, target scaling, metrics) and
:class:`MoleculeDataModule` (PyG loaders). The only floor besides the CLI that imports Lightning."""
from __future__ import annotations

import copy
import time
import warnings
from typing import Dict, List, Optional, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch_geometric.loader import DataLoader

from plstm_graph.models.molecule import MoleculeModel

from .metrics import compute_metrics, primary_metric

__all__ = ["MoleculeLitModule", "MoleculeDataModule", "masked_loss", "plstm_branch_parameters"]

# MoleculeLitModule.transfer_batch_to_device is meant to be used with MoleculeDataModule (which keeps the default)
warnings.filterwarnings("ignore", message="You have overridden `transfer_batch_to_device` in `LightningModule` but")


def masked_loss(task: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean loss over labelled entries only (NaN = missing): MSE (regression) or BCE with logits.

    Shapes:
        pred, target: ``[B, T]`` -> scalar.

    Example:
        >>> float(masked_loss("regression", torch.tensor([[1.0, 5.0]]), torch.tensor([[3.0, float("nan")]])))
        4.0
    """
    mask = ~torch.isnan(target)
    # masked by torch.where, not boolean indexing or `if mask.any()`: both copy to the host (a device sync
    # in every GPU training step); with no label at all the loss is 0 and still depends on pred (DDP needs
    # every parameter used)
    p, t = pred.float(), torch.where(mask, target, 0.0).float()
    if task == "regression":
        per = (p - t) ** 2
    else:
        per = torch.nn.functional.binary_cross_entropy_with_logits(p, t, reduction="none")
    return torch.where(mask, per, 0.0).sum() / mask.sum().clamp(min=1)


def plstm_branch_parameters(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    """The parameters of every :class:`~plstm_graph.nn.PLSTMGraphLayer` in ``model`` and the LayerScale vectors
    on their outputs (the pLSTM branch of each block; not the blocks' norms, local terms and MLPs). Empty for
    the message-passing baselines.

    Example:
        >>> m = MoleculeModel("plstm", hidden=8, num_layers=2, num_heads=2)
        >>> len(plstm_branch_parameters(m)) == 2 * (len(list(m.backbone.blocks[0].layer.parameters())) + 1)
        True
    """
    from plstm_graph.nn import PLSTMGraphLayer
    from plstm_graph.nn.blocks import PLSTMGraphBlock

    params: List[torch.nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, PLSTMGraphLayer):
            params.extend(module.parameters())
        elif isinstance(module, PLSTMGraphBlock) and module.layer_scale is not None:
            params.append(module.layer_scale)
    return params


class MoleculeLitModule(pl.LightningModule):
    """Trains a :class:`~plstm_graph.models.molecule.MoleculeModel`.

    Regression targets are standardised with the training set's per-target mean / std (``target_mean``,
    ``target_std`` buffers, saved with the model); predictions are returned in original units.
    Classification outputs are logits; :meth:`predict_batch` returns probabilities.

    ``ema_decay > 0`` keeps an exponential moving average of the weights (``ema_model``, updated after every
    optimizer step with decay ``min(ema_decay, (1 + n) / (10 + n))`` at step ``n``; buffers such as BatchNorm
    statistics are copied). Validation, :meth:`predict_batch` and :meth:`eval_model` then use the average.

    ``plstm_lr_scale``: the pLSTM branch (:func:`plstm_branch_parameters`: the pLSTM layers and their LayerScale)
    trains with learning rate ``lr * plstm_lr_scale`` (a second AdamW parameter group, the same warm-up and
    decay); everything else with ``lr``. 1 (default here): one learning rate. The CLI's default is 0.3
    (:class:`~plstm_graph.train.run.TrainConfig`): with it the local part of each block fits first and the
    pLSTM paths move more slowly (measured on FreeSolv, README).
    """

    def __init__(self, model_kwargs: Dict, task: str, target_mean: Sequence[float], target_std: Sequence[float],
                 lr: float = 1e-3, weight_decay: float = 0.0, epochs: int = 50, warmup_epochs: int = 2,
                 ema_decay: float = 0.0, plstm_lr_scale: float = 1.0):
        super().__init__()
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if not (plstm_lr_scale > 0 and np.isfinite(plstm_lr_scale)):
            raise ValueError(f"plstm_lr_scale must be a positive number, got {plstm_lr_scale}")
        self.save_hyperparameters()
        self.task = task
        self.model = MoleculeModel(**model_kwargs)
        self.ema_model: Optional[MoleculeModel] = None
        if ema_decay > 0:
            self.ema_model = copy.deepcopy(self.model)
            self.ema_model.requires_grad_(False)
        self._ema_steps = 0
        self.register_buffer("target_mean", torch.as_tensor(target_mean, dtype=torch.float32).view(1, -1))
        self.register_buffer("target_std", torch.as_tensor(target_std, dtype=torch.float32).view(1, -1))
        self._val_out: List = []
        self.epoch_seconds: List[float] = []
        self._t0 = None

    # -- model in original units
    def forward(self, batch) -> torch.Tensor:
        return self.model(batch)

    def eval_model(self) -> MoleculeModel:
        """The weights used for validation and prediction: the moving average if kept, else the model."""
        return self.ema_model if self.ema_model is not None else self.model

    @torch.no_grad()
    def update_ema(self) -> None:
        """One moving-average step towards the current weights (a no-op without ``ema_decay``)."""
        if self.ema_model is None:
            return
        n = self._ema_steps
        self._ema_steps += 1
        decay = min(float(self.hparams.ema_decay), (1.0 + n) / (10.0 + n))
        # multi-tensor ops: a few launches per step instead of one per parameter and buffer
        torch._foreach_lerp_(list(self.ema_model.parameters()), [p.detach() for p in self.model.parameters()],
                             1.0 - decay)
        ema_buffers = list(self.ema_model.buffers())
        if ema_buffers:
            torch._foreach_copy_(ema_buffers, list(self.model.buffers()))

    def predict_batch(self, batch) -> torch.Tensor:
        """``[B, T]`` predictions: original units (regression) or probabilities (classification)."""
        out = self.eval_model()(batch).float()
        if self.task == "regression":
            return out * self.target_std + self.target_mean
        return torch.sigmoid(out)

    def _scaled_target(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.target_mean) / self.target_std if self.task == "regression" else y

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        """pLSTM batches: schedules and Triton plans are built on the CPU batch, then moved with it
        (:func:`~plstm_graph.graph.prepare_batch`), so the step on the GPU never syncs for them. With loader
        workers (:class:`MoleculeDataModule`) that was done in the workers and only the copy is left here."""
        from plstm_graph.graph import DAGData, PackedBatch, prepare_batch

        if isinstance(batch, PackedBatch):  # prepared in a loader worker: one copy, then views
            return prepare_batch(batch, device)
        if isinstance(batch, DAGData) and self.model.model_name == "plstm":
            return prepare_batch(batch, device, keys=self.model)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # -- steps
    def training_step(self, batch, batch_idx):
        loss = masked_loss(self.task, self.model(batch), self._scaled_target(batch.y))
        self.log("train_loss", loss, batch_size=int(batch.num_graphs), prog_bar=True, on_step=False, on_epoch=True,
                 sync_dist=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.update_ema()

    def validation_step(self, batch, batch_idx):
        out = self.eval_model()(batch)
        loss = masked_loss(self.task, out, self._scaled_target(batch.y))
        self.log("val_loss", loss, batch_size=int(batch.num_graphs), on_step=False, on_epoch=True, sync_dist=True)
        self._val_out.append((self.predict_batch(batch).detach(), batch.y.detach()))

    def on_validation_epoch_end(self):
        if not self._val_out:
            return
        pred = torch.cat([p for p, _ in self._val_out])
        true = torch.cat([t for _, t in self._val_out])
        self._val_out.clear()
        if self.trainer is not None and self.trainer.world_size > 1:
            pred = self.all_gather(pred).reshape(-1, pred.size(-1))
            true = self.all_gather(true).reshape(-1, true.size(-1))
        metrics = compute_metrics(self.task, true.float().cpu().numpy(), pred.float().cpu().numpy())
        name, mode = primary_metric(self.task)
        for k, v in metrics.items():
            if np.isnan(v):  # e.g. one-class validation set: keep the monitor finite and "bad"
                v = float("inf") if (k == name and mode == "min") else (0.0 if k == name else v)
            self.log(f"val_{k}", float(v), prog_bar=(k == name), sync_dist=False, rank_zero_only=False)

    def on_train_epoch_start(self):
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self):
        if self._t0 is not None:
            self.epoch_seconds.append(time.perf_counter() - self._t0)

    def configure_optimizers(self):
        lr, scale = self.hparams.lr, float(self.hparams.get("plstm_lr_scale", 1.0))  # absent in older checkpoints
        branch = {id(p) for p in plstm_branch_parameters(self.model)} if scale != 1.0 else set()
        groups = [{"params": [p for p in self.model.parameters() if id(p) not in branch]}]
        if branch:
            groups.append({"params": [p for p in self.model.parameters() if id(p) in branch], "lr": lr * scale})
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=self.hparams.weight_decay)
        epochs, warm = max(int(self.hparams.epochs), 1), int(self.hparams.warmup_epochs)

        def factor(epoch: int) -> float:  # linear warm-up, then cosine decay to 5% of lr
            if epoch < warm:
                return (epoch + 1) / (warm + 1)
            progress = (epoch - warm) / max(epochs - warm, 1)
            return 0.05 + 0.95 * 0.5 * (1.0 + np.cos(np.pi * min(progress, 1.0)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class MoleculeDataModule(pl.LightningDataModule):
    """Train / val / test lists of :class:`~plstm_graph.graph.DAGData` as PyG loaders (Lightning adds the
    distributed sampler under DDP).

    ``num_workers > 0``: the workers (persistent) also do the host part of moving a batch to the device: for
    the model being trained (the attached trainer's module) they build the pLSTM schedules and, when the
    trainer runs on CUDA, their Triton plans, and pack everything into one buffer
    (:class:`~plstm_graph.graph.PrepareCollate`); the main process only copies it
    (:meth:`MoleculeLitModule.transfer_batch_to_device`), from pinned memory on CUDA. ``0``: PyG's loader in
    the main process, as before.
    """

    def __init__(self, train: list, val: list, test: list, batch_size: int = 32, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.train_set, self.val_set, self.test_set = train, val, test
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed

    def _prepare_collate(self, data):
        """The workers' collate function: schedules (and plans) for the attached trainer's model and device."""
        from plstm_graph.graph import PrepareCollate

        trainer = self.trainer
        module = trainer.lightning_module if trainer is not None else None
        model = getattr(module, "model", None)
        keys = model if getattr(model, "model_name", None) == "plstm" else ()
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        return PrepareCollate(data, keys=keys, device=device), device.type == "cuda"

    def _loader(self, data, shuffle: bool):
        gen = torch.Generator().manual_seed(self.seed) if shuffle else None
        # a trailing training batch of one molecule (possibly one atom) breaks BatchNorm in the baselines;
        # drop it (the order is reshuffled every epoch, so no molecule is left out for good)
        drop_last = shuffle and len(data) % self.batch_size == 1 and len(data) > self.batch_size
        if self.num_workers == 0:
            return DataLoader(data, batch_size=self.batch_size, shuffle=shuffle, generator=gen, drop_last=drop_last)
        collate, pin = self._prepare_collate(data)
        return torch.utils.data.DataLoader(data, batch_size=self.batch_size, shuffle=shuffle,
                                           num_workers=self.num_workers, collate_fn=collate, pin_memory=pin,
                                           generator=gen, persistent_workers=True, drop_last=drop_last)

    def train_dataloader(self):
        return self._loader(self.train_set, True)

    def val_dataloader(self):
        return self._loader(self.val_set, False)

    def test_dataloader(self):
        return self._loader(self.test_set, False)
