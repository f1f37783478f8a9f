"""Screen variants of the default molecule pLSTM on FreeSolv that have no CLI flag (README, Results, issue #4).

Each variant patches :class:`~plstm_graph.models.MoleculeModel`, :class:`~plstm_graph.nn.PLSTMGraphBlock` or the
optimiser for this process only, then runs :func:`~plstm_graph.train.compare.compare_models` with the CLI's
defaults at the time of the screen (FreeSolv, scaffold split, 40 epochs, lr 3e-3, seeds 0-4, one learning rate:
``plstm_lr_scale=1``): ``base`` reproduces ``plstm-graph compare --dataset freesolv --models plstm --seeds 5
--epochs 40 --lr 3e-3 --plstm-lr-scale 1`` to the last digit, and ``plr0.3`` the current defaults.
Prints one JSON line: mean and std (over seeds) of validation and test RMSE, and the per-seed values.

    OMP_NUM_THREADS=1 python benchmarks/freesolv_variants.py VARIANT --out runs/fs5-VARIANT

Variants (the pLSTM molecule model's defaults otherwise: local bond term, LayerScale 0.01, spread gate init):

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

``--dataset b3db`` screens on B3DB classification instead, with the CLI's current defaults and the README's B3DB
budget (``plstm-graph compare --dataset b3db --models plstm --seeds 3 --epochs 12 --warmup-epochs 1 --split
scaffold``; ``base`` reproduces it); it prints ROC-AUC instead of RMSE.
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
from plstm_graph.train.compare import compare_models
from plstm_graph.train.run import TrainConfig


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
        elif variant in ("pD", "pP"):
            dim, heads, m = kw.get("hidden", 128), kw.get("num_heads", 4), variant[1]
            self.backbone = PLSTMGraphStack(dim, heads, pattern=[(m, False), (m, True)] * 2, edge_dim=dim,
                                            dropout=kw.get("dropout", 0.0), local_mix=True, layer_scale=0.01,
                                            **molecule.plstm_molecule_init(heads))

    molecule.MoleculeModel.__init__ = init

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
    p.add_argument("--seeds", type=int, default=None, help="default 5 (FreeSolv) or 3 (B3DB)")
    p.add_argument("--dataset", choices=["freesolv", "b3db"], default="freesolv")
    p.add_argument("--plstm-lr-scale", type=float, default=None,
                   help="override the pLSTM learning-rate scale (FreeSolv screen default: 1, the defaults then)")
    args = p.parse_args()
    patch(args.variant)
    if args.dataset == "b3db":
        cfg, metric, seeds = TrainConfig(dataset="b3db", epochs=12, warmup_epochs=1, progress=False), "roc_auc", 3
        if args.variant.startswith("plr"):
            cfg.plstm_lr_scale = float(args.variant[len("plr"):])
    else:
        # plrX: the pLSTM branch at lr x X, which is what --plstm-lr-scale X does (it came out of this screen)
        lr_scale = float(args.variant[len("plr"):]) if args.variant.startswith("plr") else 1.0
        cfg = TrainConfig(dataset="freesolv", epochs=40, lr=3e-3, plstm_lr_scale=lr_scale, progress=False)
        metric, seeds = "rmse", 5
    if args.plstm_lr_scale is not None:
        cfg.plstm_lr_scale = args.plstm_lr_scale
    res = compare_models(cfg, ["plstm"], list(range(args.seeds or seeds)), args.out)
    runs = sorted(res["runs"], key=lambda r: r["seed"])
    val, test = [r["val"][metric] for r in runs], [r["test"][metric] for r in runs]
    print(json.dumps({"variant": args.variant, "val": [np.mean(val), np.std(val)],
                      "test": [np.mean(test), np.std(test)], "val_seeds": val, "test_seeds": test}))


if __name__ == "__main__":
    main()
