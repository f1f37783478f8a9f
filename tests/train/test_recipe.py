"""The training recipe (weight moving average, clipping, warm-up) and the molecule pLSTM's gate initialisation."""
import dataclasses

import pytest
import torch

pytest.importorskip("rdkit")
pytest.importorskip("lightning")

from torch_geometric.loader import DataLoader  # noqa: E402

from plstm_graph.chem import smiles_to_dag  # noqa: E402
from plstm_graph.models.molecule import MoleculeModel, plstm_molecule_init  # noqa: E402
from plstm_graph.train.lightning import MoleculeLitModule  # noqa: E402
from plstm_graph.train.run import TrainConfig  # noqa: E402

KW = dict(model="plstm", num_tasks=1, hidden=8, num_layers=2, num_heads=2)


def test_plstm_molecule_gate_biases_spread_over_heads_and_can_be_overridden():
    assert plstm_molecule_init(4) == {"source_bias": [-4.0, -2.6667, -1.3333, 0.0],
                                      "mark_bias": [-4.0, -2.6667, -1.3333, 0.0],
                                      "direct_bias": [-6.0, -4.0, -2.0, 0.0]}
    assert plstm_molecule_init(1) == {"source_bias": [-4.0], "mark_bias": [-4.0], "direct_bias": [-6.0]}
    model = MoleculeModel(**{**KW, "num_heads": 4})
    for block in model.backbone.blocks:
        layer = block.layer
        torch.testing.assert_close(layer.source_bias, torch.tensor([-4.0, -2.6667, -1.3333, 0.0]))
        torch.testing.assert_close(layer.mark_bias, torch.tensor([-4.0, -2.6667, -1.3333, 0.0]))
        torch.testing.assert_close(layer.direct_bias, torch.tensor([-6.0, -4.0, -2.0, 0.0]))
        assert torch.all(layer.transition_bias == 1.0)  # the paper's critical transitions are kept
    paper = MoleculeModel(**KW, plstm_kwargs=dict(source_bias=-4.0, mark_bias=-4.0, direct_bias=-6.0))
    assert all(torch.all(b.layer.source_bias == -4.0) and torch.all(b.layer.direct_bias == -6.0)
               for b in paper.backbone.blocks)


def test_ema_follows_the_weights_and_is_what_predicts():
    torch.manual_seed(0)
    lit = MoleculeLitModule(KW, "regression", [1.0], [2.0], ema_decay=0.5)
    assert lit.eval_model() is lit.ema_model
    opt_params = {id(p) for g in lit.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in lit.model.parameters()}  # the average is never optimised
    assert not any(p.requires_grad for p in lit.ema_model.parameters())
    w, we = lit.model.head[0].weight, lit.ema_model.head[0].weight
    start = we.detach().clone()
    with torch.no_grad():
        w.add_(1.0)
    lit.update_ema()  # step 0: decay min(0.5, 1/10) = 0.1
    torch.testing.assert_close(we, 0.1 * start + 0.9 * w.detach())
    lit.update_ema()  # step 1: min(0.5, 2/11)
    d = 2.0 / 11.0
    torch.testing.assert_close(we, d * (0.1 * start + 0.9 * w.detach()) + (1 - d) * w.detach())
    batch = next(iter(DataLoader([smiles_to_dag("CCO"), smiles_to_dag("c1ccccc1O")], batch_size=2)))
    lit.eval()
    with torch.no_grad():
        torch.testing.assert_close(lit.predict_batch(batch), lit.ema_model(batch) * 2.0 + 1.0)


def test_no_ema_by_argument_means_the_model_itself():
    lit = MoleculeLitModule(KW, "regression", [0.0], [1.0])
    assert lit.ema_model is None and lit.eval_model() is lit.model
    lit.update_ema()  # a no-op
    with pytest.raises(ValueError, match="ema_decay"):
        MoleculeLitModule(KW, "regression", [0.0], [1.0], ema_decay=1.0)


def test_cli_recipe_flags_default_to_train_config_and_pass_through():
    from plstm_graph.cli import build_parser

    args = build_parser().parse_args(["train"])
    cfg = TrainConfig()
    assert (args.warmup_epochs, args.ema_decay, args.grad_clip) == (cfg.warmup_epochs, cfg.ema_decay, cfg.grad_clip)
    from plstm_graph.train.cli import _config

    args = build_parser().parse_args(["train", "--warmup-epochs", "3", "--ema-decay", "0.9", "--grad-clip", "2"])
    got = _config(args, "plstm", 0, "out")
    assert (got.warmup_epochs, got.ema_decay, got.grad_clip) == (3, 0.9, 2.0)


@pytest.mark.parametrize("field,value", [("ema_decay", 1.0), ("grad_clip", -1.0), ("warmup_epochs", -1)])
def test_bad_recipe_values_are_rejected(field, value):
    with pytest.raises(ValueError):
        dataclasses.replace(TrainConfig(), **{field: value}).validate()


def test_select_last_trains_every_epoch_and_keeps_the_last_weights(tmp_path):
    from plstm_graph.train.run import train_run

    smiles = ["CCO", "CCN", "CCC", "CCCC", "CCCO", "CC(C)O", "c1ccccc1", "c1ccccc1O", "c1ccccc1N", "CC(=O)O",
              "OCCO", "NCCN"]
    path = tmp_path / "m.csv"
    path.write_text("smiles,y\n" + "\n".join(f"{s},{0.3 * len(s)}" for s in smiles) + "\n")
    cfg = TrainConfig(dataset=None, csv=str(path), smiles_column="smiles", target_columns=["y"], split="random",
                      epochs=3, hidden=8, num_layers=2, num_heads=2, batch_size=4, select="last", patience=0,
                      out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), progress=False)
    result = train_run(cfg)
    assert result["epochs_run"] == 3  # patience 0 would have stopped a "best" run after one bad epoch
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "run" / "checkpoints" / "best.ckpt").exists()


def test_local_mix_is_the_plstm_default_and_a_cli_flag():
    from plstm_graph.cli import build_parser
    from plstm_graph.train.cli import _config
    from plstm_graph.train.run import _model_kwargs

    assert TrainConfig().local_mix == "gine"
    # the model's default too: GIN's layer (ReLU messages, BatchNorm MLP) in every block
    assert all(b.local_kind == "gine" and b.local.activation == "relu" for b in MoleculeModel(**KW).backbone.blocks)
    args = build_parser().parse_args(["train"])
    assert _config(args, "plstm", 0, "out").local_mix == "gine"
    for text, value in (("off", False), ("on", True), ("gine", "gine"), ("gin", "gin"), ("mix", True)):
        args = build_parser().parse_args(["compare", "--local-mix", text])
        cfg = _config(args, "plstm", 0, "out")
        assert cfg.local_mix == value and _model_kwargs(cfg, 1)["local_mix"] == value
        assert type(_model_kwargs(cfg, 1)["local_mix"]) is type(value)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--local-mix", "ginx"])
    assert "local_mix" not in _model_kwargs(dataclasses.replace(cfg, model="gin"), 1)  # pLSTM only
    assert TrainConfig().layer_scale == 0.01 and _model_kwargs(TrainConfig(), 1)["layer_scale"] == 0.01
    args = build_parser().parse_args(["train", "--local-mix", "off", "--layer-scale", "0"])
    cfg = _config(args, "plstm", 0, "out")
    assert _model_kwargs(cfg, 1)["layer_scale"] is None and _model_kwargs(cfg, 1)["local_mix"] is False
    with pytest.raises(ValueError, match="layer-scale"):
        dataclasses.replace(TrainConfig(), layer_scale=-1.0).validate()
    off = MoleculeModel(**KW, local_mix=False)
    assert all(b.local is None for b in off.backbone.blocks)
    for b in MoleculeModel(**KW).backbone.blocks:  # LayerScale 0.01 on every pLSTM layer by default
        torch.testing.assert_close(b.layer_scale.detach(), torch.full((KW["hidden"],), 0.01))
    assert all(b.layer_scale is None for b in MoleculeModel(**KW, layer_scale=None).backbone.blocks)


def test_local_mix_changes_the_prediction_and_old_checkpoints_still_load(tmp_path):
    from plstm_graph.train.run import load_trained
    from plstm_graph.chem import featurization_hash

    torch.manual_seed(0)
    batch = next(iter(DataLoader([smiles_to_dag(s) for s in ("CCO", "c1ccccc1O", "CC(=O)N")], batch_size=3)))
    model = MoleculeModel(**KW, local_mix=True)
    out = model(batch)
    out.sum().backward()
    assert all(b.local.edge.weight.grad.abs().sum() > 0 for b in model.backbone.blocks)
    with torch.no_grad():
        for b in model.backbone.blocks:
            b.local.edge.weight.mul_(3.0)
    assert not torch.allclose(model(batch), out)
    # a model.pt written before local_mix existed (no such key, no local parameters) loads as it was trained
    old = MoleculeModel(**KW, local_mix=False, layer_scale=None)
    assert not any("layer_scale" in k for k in old.state_dict())
    torch.save({"model_kwargs": dict(KW), "state_dict": old.state_dict(), "task": "regression", "targets": ["y"],
                "target_mean": [0.0], "target_std": [1.0], "featurization": featurization_hash(), "config": {}},
               tmp_path / "model.pt")
    loaded = load_trained(str(tmp_path))
    assert all(b.local is None and b.layer_scale is None for b in loaded.model.backbone.blocks)
    old.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(batch), old(batch))
    # a model.pt of the previous default (GELU local term: local_mix True saved in its kwargs) keeps its blocks
    model.eval()
    torch.save({"model_kwargs": dict(KW, local_mix=True, layer_scale=0.01), "state_dict": model.state_dict(),
                "task": "regression", "targets": ["y"], "target_mean": [0.0], "target_std": [1.0],
                "featurization": featurization_hash(), "config": {}}, tmp_path / "model.pt")
    loaded = load_trained(str(tmp_path))
    assert all(b.local_kind == "mix" for b in loaded.model.backbone.blocks)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(batch), model(batch))


def test_plstm_lr_scale_is_the_default_a_cli_flag_and_a_second_parameter_group():
    from plstm_graph.cli import build_parser
    from plstm_graph.train.cli import _config
    from plstm_graph.train.lightning import plstm_branch_parameters

    assert TrainConfig().plstm_lr_scale == 0.3
    assert _config(build_parser().parse_args(["train"]), "plstm", 0, "out").plstm_lr_scale == 0.3
    args = build_parser().parse_args(["compare", "--plstm-lr-scale", "1"])
    assert _config(args, "plstm", 0, "o").plstm_lr_scale == 1.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="plstm-lr-scale"):
            dataclasses.replace(TrainConfig(), plstm_lr_scale=bad).validate()
    with pytest.raises(ValueError, match="plstm_lr_scale"):
        MoleculeLitModule(KW, "regression", [0.0], [1.0], plstm_lr_scale=0.0)

    lit = MoleculeLitModule(KW, "regression", [0.0], [1.0], lr=1e-2, warmup_epochs=0, plstm_lr_scale=0.3)
    rest, branch = lit.configure_optimizers()["optimizer"].param_groups
    assert branch["lr"] == pytest.approx(3e-3) and rest["lr"] == pytest.approx(1e-2)
    expected = {id(p) for b in lit.model.backbone.blocks for p in [*b.layer.parameters(), b.layer_scale]}
    assert {id(p) for p in branch["params"]} == expected == {id(p) for p in plstm_branch_parameters(lit.model)}
    assert len(rest["params"]) + len(branch["params"]) == len(list(lit.model.parameters()))
    assert {id(p) for p in rest["params"]} | expected == {id(p) for p in lit.model.parameters()}
    # one group: scale 1, a message-passing model (no pLSTM branch), a checkpoint saved before the option existed
    assert len(MoleculeLitModule(KW, "regression", [0.0], [1.0]).configure_optimizers()["optimizer"].param_groups) == 1
    gin = MoleculeLitModule({**KW, "model": "gin"}, "regression", [0.0], [1.0], plstm_lr_scale=0.3)
    assert plstm_branch_parameters(gin.model) == []
    assert len(gin.configure_optimizers()["optimizer"].param_groups) == 1
    del lit.hparams["plstm_lr_scale"]
    assert len(lit.configure_optimizers()["optimizer"].param_groups) == 1


def test_plstm_lr_scale_scales_the_branch_update_only_and_changes_the_model():
    from plstm_graph.train.lightning import masked_loss, plstm_branch_parameters

    batch = next(iter(DataLoader([smiles_to_dag(s) for s in ("CC(C)CO", "c1ccccc1O", "CC(=O)N")], batch_size=3)))
    steps = {}
    for scale in (1.0, 0.25):
        torch.manual_seed(0)
        lit = MoleculeLitModule(KW, "regression", [0.0], [1.0], lr=1e-2, weight_decay=0.01, warmup_epochs=0,
                                plstm_lr_scale=scale)
        before = [p.detach().clone() for p in lit.model.parameters()]
        opt = lit.configure_optimizers()["optimizer"]
        out = lit.model(batch)
        assert out.shape == (3, 1)
        masked_loss("regression", out, torch.tensor([[1.0], [-2.0], [0.5]])).backward()
        branch = {id(p) for p in plstm_branch_parameters(lit.model)}
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lit.model.parameters() if id(p) in branch)
        opt.step()
        steps[scale] = ([p.detach() - b for p, b in zip(lit.model.parameters(), before)],
                        [id(p) in branch for p in lit.model.parameters()], lit.model.eval()(batch).detach())
    (full, is_branch, y_full), (scaled, _, y_scaled) = steps[1.0], steps[0.25]
    assert any(is_branch) and not all(is_branch)
    for d1, d2, in_branch in zip(full, scaled, is_branch):  # AdamW's first step is linear in the learning rate
        torch.testing.assert_close(d2, 0.25 * d1 if in_branch else d1, rtol=1e-4, atol=2e-6)  # |step| ~ lr >= 2.5e-3
    assert not torch.allclose(y_full, y_scaled)
