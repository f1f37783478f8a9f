"""Screen variants of the default molecule pLSTM on FreeSolv that have no CLI flag (README, Results, issue #4).

Each variant patches :class:`~plstm_graph.models.MoleculeModel`, :class:`~plstm_graph.nn.PLSTMGraphBlock` or the
optimiser for this process only, then runs :func:`~plstm_graph.train.compare.compare_models` with the CLI's
defaults at the time of the screen (FreeSolv, scaffold split, 40 epochs, lr 3e-3, seeds 0-4, one learning rate:
``plstm_lr_scale=1``, and the GELU local term, ``local_mix=True``, the default until 2026-11-29, which the
variants below patch): ``base`` reproduces ``plstm-graph compare --dataset freesolv --models plstm --seeds 5
--epochs 40 --lr 3e-3 --plstm-lr-scale 1 --local-mix on`` to the last digit, and ``plr0.3`` the defaults of
that time. The ``gine`` variant's block became the default (``--local-mix gine``; the library's own
implementation, tested equal to the ``GINEConv`` form here, draws its initial weights in another order).
Prints one JSON line: mean and std (over seeds) of validation and test RMSE, and the per-seed values.

    OMP_NUM_THREADS=1 python benchmarks/freesolv_variants.py VARIANT --out runs/fs5-VARIANT

Variants (the pLSTM molecule model with the GELU local term otherwise: LayerScale 0.01, spread gate init):

* ``base``: the defaults.
* ``bidir``: every block runs half its heads on the block's DAG direction and half on the reversed DAG (each
  half with ``plstm_molecule_init(H / 2)``), outputs summed; the same parameters and about the same work.
* ``attn``: attention pooling (``readout="attention"``) instead of mean + sum.
* ``pD`` / ``pP``: pattern D, D-reversed, D, D-reversed (or the same with P) instead of P, P-rev, D, D-rev.
* ``pdropX``: dropout X on the pLSTM branch only (before its residual; the MLP and head keep ``--dropout``).
* ``plrX``: the pLSTM layers' parameters and their LayerScale train with lr x X (a second AdamW group): run
  here as ``TrainConfig(plstm_lr_scale=X)``, i.e. ``--plstm-lr-scale X``, which came out of this screen.
* ``bnmlp``: every block's MLP gets a BatchNorm after its first linear layer (``Linear, BatchNorm1d, GELU,
  Linear``), as GIN's MLPs have.

GIN-like local parts (issue: match GIN on B3DB; every block keeps a pLSTM branch with the block's (mode,
reverse), LayerScale and gate init of the defaults; ``GINE(h)`` below is ``GINEConv`` with GIN's MLP ``Linear,
BatchNorm1d, ReLU, Linear``, ``train_eps=True``, ``edge_dim=hidden``, over both directions of every bond, as the
``gin`` baseline's layers; ``drop`` is the model's ``--dropout``):

* ``gps``: GraphGPS-style block (Rampasek et al. 2022) with the pLSTM layer as its global part, post-norm:
  ``a = BN(h + drop(GINE(h)))``, ``b = BN(h + drop(s * pLSTM(h)))``, ``h = a + b``, ``h = BN(h + drop(FF(h)))``
  with ``FF = Linear(d, 2d), ReLU, Dropout, Linear(2d, d)``; no final norm of the stack (it ends in a BN).
* ``gpsrms``: ``gps`` with RMSNorm in place of every BatchNorm of the block (GINE's MLP keeps its BN).
* ``gine``: the default pre-norm pLSTM residual, then GIN's layer as the second residual in place of the MLP and
  the local bond term: ``x = x + drop(s * pLSTM(RMSNorm(x)))``, ``x = x + drop(ReLU(GINE(x)))``. GINE reads the
  un-normalised stream, as GIN's layers read theirs (its MLP's BatchNorm sets the scale); the stack's final
  RMSNorm stays.

The LayerScale ``s`` of these blocks is in the pLSTM learning-rate group, as the default blocks' is.

``--dataset b3db`` screens on B3DB classification instead, with the CLI's current defaults and the README's B3DB
budget (``plstm-graph compare --dataset b3db --models plstm --seeds 3 --epochs 12 --warmup-epochs 1 --split
scaffold``; ``base`` reproduces it); it prints ROC-AUC instead of RMSE. ``--seed-list`` runs the given seeds
only, e.g. one seed per process:

    OMP_NUM_THREADS=1 python benchmarks/freesolv_variants.py gine --dataset b3db --seed-list 2 --out runs/b3-gine-s2
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from torch import nn

from plstm_graph.models import molecule
from plstm_graph.nn import PLSTMGraphLayer, PLSTMGraphStack
from plstm_graph.nn.blocks import PLSTMGraphBlock
from plstm_graph.train import lightning
from plstm_graph.train.compare import compare_models
from plstm_graph.train.run import TrainConfig


def gine_conv(dim: int) -> nn.Module:
    """The ``gin`` baseline's layer: ``GINEConv`` with ``Linear, BatchNorm1d, ReLU, Linear``, ``train_eps``."""
    from torch_geometric.nn import GINEConv

    mlp = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(), nn.Linear(dim, dim))
    return GINEConv(mlp, train_eps=True, edge_dim=dim)


def both_directions(edge_index: torch.Tensor, edge_attr: torch.Tensor):
    """Every DAG edge in both directions, bond features repeated (what the baselines' convolutions read)."""
    return torch.cat([edge_index, edge_index.flip(0)], dim=1), torch.cat([edge_attr, edge_attr], dim=0)


class HybridBlock(nn.Module):
    """A block of variant ``gps``, ``gpsrms`` or ``gine`` (module docstring): a pLSTM layer with LayerScale and
    the ``gin`` baseline's GINEConv layer. ``forward(x [N, d], batch, edge_attr [E, d]) -> [N, d]``, with
    ``edge_attr`` over ``batch.edge_index`` (the DAG) as the molecule model's backbone gets it."""

    def __init__(self, kind: str, dim: int, num_heads: int, mode: str, reverse: bool, dropout: float,
                 layer_scale: float, **gate_init):
        super().__init__()
        self.kind = kind
        self.layer = PLSTMGraphLayer(dim, num_heads, mode=mode, reverse=reverse, edge_dim=dim, **gate_init)
        self.layer_scale = nn.Parameter(torch.full((dim,), float(layer_scale)))
        self.conv = gine_conv(dim)
        self.drop = nn.Dropout(dropout)
        if kind == "gine":
            self.norm1 = nn.RMSNorm(dim, eps=1e-5)
        else:
            def norm():
                return nn.BatchNorm1d(dim) if kind == "gps" else nn.RMSNorm(dim, eps=1e-5)

            self.norm_local, self.norm_glob, self.norm_out = norm(), norm(), norm()
            self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, batch, edge_attr: torch.Tensor) -> torch.Tensor:
        ei, e2 = both_directions(batch.edge_index, edge_attr)
        if self.kind == "gine":
            x = x + self.drop(self.layer_scale * self.layer(self.norm1(x), batch, edge_attr))
            return x + self.drop(nn.functional.relu(self.conv(x, ei, e2)))
        local = self.norm_local(x + self.drop(self.conv(x, ei, e2)))
        glob = self.norm_glob(x + self.drop(self.layer_scale * self.layer(x, batch, edge_attr)))
        h = local + glob
        return self.norm_out(h + self.drop(self.ff(h)))


class HybridStack(nn.Module):
    """:class:`HybridBlock` s on the default stack's (mode, reverse) pattern; final RMSNorm for ``gine`` only."""

    def __init__(self, kind: str, dim: int, num_heads: int, pattern, dropout: float, layer_scale: float,
                 **gate_init):
        super().__init__()
        self.pattern = list(pattern)
        self.blocks = nn.ModuleList(HybridBlock(kind, dim, num_heads, m, r, dropout, layer_scale, **gate_init)
                                    for m, r in self.pattern)
        self.norm = nn.RMSNorm(dim, eps=1e-5) if kind == "gine" else nn.Identity()

    def forward(self, x: torch.Tensor, batch, edge_attr: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, batch, edge_attr)
        return self.norm(x)


HYBRIDS = ("gps", "gpsrms", "gine")


class BothDirections(nn.Module):
    """Half the heads on the DAG, half on its reverse; ``[N, dim] -> [N, dim]`` (sum of the two outputs)."""

    def __init__(self, dim: int, num_heads: int, mode: str, edge_dim: int):
        super().__init__()
        h = num_heads // 2
        init = molecule.plstm_molecule_init(h)
        kw = dict(mode=mode, edge_dim=edge_dim, head_dim=dim // num_heads, **init)
        self.fwd = PLSTMGraphLayer(dim, h, reverse=False, **kw)
        self.rev = PLSTMGraphLayer(dim, h, reverse=True, **kw)
        self.mode, self.reverse = mode, False  # what the block's local term reads its edge order from

    def forward(self, x, schedule, edge_attr=None):
        return self.fwd(x, schedule, edge_attr) + self.rev(x, schedule, edge_attr)


def patch(variant: str) -> None:
    original_init = molecule.MoleculeModel.__init__

    def init(self, *args, **kw):
        if variant == "attn":
            kw["readout"] = "attention"
        original_init(self, *args, **kw)
        if self.model_name != "plstm":
            return
        if variant == "bidir":
            for block in self.backbone.blocks:
                lay = block.layer
                block.layer = BothDirections(lay.dim, lay.num_heads, lay.mode, lay.edge_dim)
        elif variant == "bnmlp":
            for block in self.backbone.blocks:
                lin1, act, lin2 = block.mlp
                block.mlp = nn.Sequential(lin1, nn.BatchNorm1d(lin1.out_features), act, lin2)
        elif variant in HYBRIDS:
            old = self.backbone
            b0 = old.blocks[0]
            heads = b0.layer.num_heads
            self.backbone = HybridStack(variant, b0.layer.dim, heads, old.pattern, dropout=b0.drop.p,
                                        layer_scale=b0.layer_scale_init if b0.layer_scale_init is not None else 1.0,
                                        **{**molecule.plstm_molecule_init(heads), **(kw.get("plstm_kwargs") or {})})
        elif variant in ("pD", "pP"):
            dim, heads, m = kw.get("hidden", 128), kw.get("num_heads", 4), variant[1]
            self.backbone = PLSTMGraphStack(dim, heads, pattern=[(m, False), (m, True)] * 2, edge_dim=dim,
                                            dropout=kw.get("dropout", 0.0), local_mix=True, layer_scale=0.01,
                                            **molecule.plstm_molecule_init(heads))

    molecule.MoleculeModel.__init__ = init

    if variant in HYBRIDS:  # the hybrid blocks' LayerScale trains with the pLSTM layers (--plstm-lr-scale)
        original_branch = lightning.plstm_branch_parameters

        def branch(model):
            return original_branch(model) + [m.layer_scale for m in model.modules() if isinstance(m, HybridBlock)]

        lightning.plstm_branch_parameters = branch

    if variant.startswith("pdrop"):
        rate = float(variant[len("pdrop"):])

        def block_forward(self, x, schedule, edge_attr=None):  # PLSTMGraphBlock.forward, own dropout on y
            y = self.layer(self.norm1(x), schedule, edge_attr)
            if self.layer_scale is not None:
                y = y * self.layer_scale
            x = x + nn.functional.dropout(y, rate, self.training)
            return x + self.drop(self.mlp(self.mlp_input(x, schedule, edge_attr)))

        PLSTMGraphBlock.forward = block_forward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("variant")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=None, help="default 5 (FreeSolv) or 3 (B3DB): seeds 0..n-1")
    p.add_argument("--seed-list", type=int, nargs="+", default=None,
                   help="explicit seeds (overrides --seeds), e.g. --seed-list 0 2 to run single seeds apart")
    p.add_argument("--dataset", choices=["freesolv", "b3db"], default="freesolv")
    p.add_argument("--plstm-lr-scale", type=float, default=None,
                   help="override the pLSTM learning-rate scale (FreeSolv screen default: 1, the defaults then)")
    args = p.parse_args()
    patch(args.variant)
    if args.dataset == "b3db":
        cfg, metric, seeds = TrainConfig(dataset="b3db", epochs=12, warmup_epochs=1, progress=False,
                                          local_mix=True), "roc_auc", 3
        if args.variant.startswith("plr"):
            cfg.plstm_lr_scale = float(args.variant[len("plr"):])
    else:
        # plrX: the pLSTM branch at lr x X, which is what --plstm-lr-scale X does (it came out of this screen)
        lr_scale = float(args.variant[len("plr"):]) if args.variant.startswith("plr") else 1.0
        cfg = TrainConfig(dataset="freesolv", epochs=40, lr=3e-3, plstm_lr_scale=lr_scale, progress=False,
                          local_mix=True)
        metric, seeds = "rmse", 5
    if args.plstm_lr_scale is not None:
        cfg.plstm_lr_scale = args.plstm_lr_scale
    seed_list = args.seed_list if args.seed_list is not None else list(range(args.seeds or seeds))
    res = compare_models(cfg, ["plstm"], seed_list, args.out)
    runs = sorted(res["runs"], key=lambda r: r["seed"])
    val, test = [r["val"][metric] for r in runs], [r["test"][metric] for r in runs]
    print(json.dumps({"variant": args.variant, "val": [np.mean(val), np.std(val)],
                      "test": [np.mean(test), np.std(test)], "seeds": [r["seed"] for r in runs], "val_seeds": val,
                      "test_seeds": test, "epoch_seconds": [r["epoch_seconds"] for r in runs]}))


if __name__ == "__main__":
    main()
