"""``benchmarks/freesolv_screen.py``: its variants patch what they say, and its table averages repeats per split
before pairing with ``base``."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rdkit")
from plstm_graph.models import molecule  # noqa: E402
from plstm_graph.nn import blocks  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "freesolv_screen.py"


def _load():
    spec = importlib.util.spec_from_file_location("freesolv_screen", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def screen(monkeypatch):
    # apply_variant rewrites these for the process; monkeypatch puts them back after the test
    monkeypatch.setattr(molecule, "plstm_molecule_init", molecule.plstm_molecule_init)
    monkeypatch.setattr(blocks, "default_pattern", blocks.default_pattern)
    return _load()


def test_gate_and_pattern_variants_reach_the_model(screen):
    assert screen.apply_variant("pD") == {}
    assert screen.apply_variant("open-gates") == {}
    model = molecule.MoleculeModel("plstm", hidden=16, num_layers=4, num_heads=2)
    assert model.backbone.pattern == [("D", False), ("D", True), ("D", False), ("D", True)]
    layer = model.backbone.blocks[0].layer
    for name in ("source_bias", "mark_bias", "direct_bias"):
        bias = [b for n, b in layer.named_parameters() if n.endswith(name) or n == name]
        assert bias and all(float(b.detach().abs().max()) == 0.0 for b in bias), name


def test_overrides_are_train_config_fields(screen):
    from plstm_graph.train.run import TrainConfig

    for name in screen.VARIANTS:
        TrainConfig(**screen.VARIANTS[name][0]).validate()
    assert screen.apply_variant("attentivefp") == {"model": "attentivefp"}


def test_summary_averages_repeats_per_split_then_pairs_with_base(screen):
    rows = [{"variant": "base", "seed": 0, "init_seed": 0, "val": 1.0, "test": 2.0},
            {"variant": "base", "seed": 0, "init_seed": 1000, "val": 3.0, "test": 4.0},
            {"variant": "base", "seed": 1, "init_seed": 1, "val": 2.0, "test": 2.0},
            {"variant": "x", "seed": 0, "init_seed": 0, "val": 1.5, "test": 2.5},
            {"variant": "x", "seed": 1, "init_seed": 1, "val": 1.0, "test": 1.0}]
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in screen.summarise(rows).splitlines()[2:]}
    assert lines["base"][:3] == ["2 (3)", f"{np.mean([2.0, 2.0]):.3f}", f"{np.mean([3.0, 2.0]):.3f}"]
    # x - base per split: val -0.5, -1.0; test -0.5, -1.0 -> mean -0.75, s.e. 0.25
    assert lines["x"][4] == "-0.750 ± 0.250" and lines["x"][5] == "-0.750 ± 0.250"
