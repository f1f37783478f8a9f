"""``plstm-graph train / predict / compare`` end to end with tiny budgets, and every user mistake."""
import csv
import io
import json

import numpy as np
import pytest
import torch

pytest.importorskip("rdkit")
pytest.importorskip("lightning")

from plstm_graph.cli import main  # noqa: E402

SMILES = ["CCO", "CCN", "CCC", "CCCC", "CCCO", "CC(C)O", "c1ccccc1", "c1ccccc1O", "c1ccccc1N", "c1ccccc1C",
          "C1CCCCC1", "C1CCCCC1O", "c1ccncc1", "c1ccncc1C", "CC(=O)O", "CC(=O)N", "OCCO", "NCCN", "C1CC1", "C1CCC1",
          "c1ccc2ccccc2c1", "c1ccoc1", "c1ccsc1", "CCOCC", "CC#N", "C=CC=C", "ClCCl", "FC(F)F", "CS(C)=O", "CCCCCC"]


def _dataset(tmp_path, classification=False, blanks=False):
    from rdkit import Chem

    rows = []
    for i, s in enumerate(SMILES):
        n = Chem.MolFromSmiles(s).GetNumAtoms()
        a = float(n > 4) if classification else 0.5 * n + 0.1 * (i % 3)
        b = "" if (blanks and i % 4 == 0) else str(-0.2 * n)
        rows.append(f"{s},{a},{b}")
    p = tmp_path / "mols.csv"
    p.write_text("smiles,a,b\n" + "\n".join(rows) + "\nnot_a_smiles,1,1\n")
    return str(p)


TINY = ["--epochs", "1", "--hidden", "16", "--layers", "2", "--heads", "2", "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    data = _dataset(tmp, blanks=True)
    out = tmp / "model"
    rc = main(["train", "--csv", data, "--smiles-column", "smiles", "--target-column", "a", "--target-column", "b",
               "--split", "random", "--cache-dir", str(tmp / "cache"), "--out", str(out), *TINY])
    assert rc == 0
    return out, data


def test_train_writes_metrics_model_and_split(trained):
    out, _ = trained
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["test"]) == {"rmse", "mae", "r2"} and set(m["val"]) == {"rmse", "mae", "r2"}
    assert np.isfinite(m["test"]["rmse"]) and m["config"]["model"] == "plstm" and m["targets"] == ["a", "b"]
    assert [d["line"] for d in m["invalid_smiles"]] == [len(SMILES) + 2]
    split = json.loads((out / "split.json").read_text())
    allrows = sorted(split["train"]["rows"] + split["val"]["rows"] + split["test"]["rows"])
    assert allrows == list(range(len(SMILES)))  # the invalid last row is in no split
    assert (out / "model.pt").is_file() and (out / "logs" / "metrics.csv").is_file()


def _predict(capsys, args):
    rc = main(["predict", *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_predict_batched_equals_alone_and_keeps_order(trained, capsys):
    out, _ = trained
    inputs = ["c1ccccc1O", "bad((", "CCO", "OCC", "C"]
    rc, text, err = _predict(capsys, ["--model-dir", str(out), "--smiles", *inputs])
    assert rc == 0 and "input 2" in err and "bad((" in err
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["smiles", "a", "b"] and [r[0] for r in rows[1:]] == inputs
    assert rows[2][1:] == ["", ""]
    assert rows[3][1:] == rows[4][1:]  # CCO and OCC: the same molecule, the same prediction
    for s, row in zip(inputs, rows[1:]):
        if s == "bad((":
            continue
        _, alone, _ = _predict(capsys, ["--model-dir", str(out), "--smiles", s])
        np.testing.assert_allclose([float(v) for v in list(csv.reader(io.StringIO(alone)))[1][1:]],
                                   [float(v) for v in row[1:]], rtol=1e-5, atol=1e-6)


def test_predict_from_csv_to_file(trained, capsys, tmp_path):
    out, data = trained
    dest = tmp_path / "pred.csv"
    rc, _, err = _predict(capsys, ["--model-dir", str(out), "--csv", data, "--smiles-column", "smiles", "--out", str(dest)])
    assert rc == 0 and f"line {len(SMILES) + 2}" in err
    rows = list(csv.reader(dest.open()))
    assert len(rows) == len(SMILES) + 2 and rows[-1][1:] == ["", ""]


def test_classification_and_compare(tmp_path, capsys):
    data = _dataset(tmp_path, classification=True)
    rc = main(["compare", "--csv", data, "--smiles-column", "smiles", "--target-column", "a", "--models", "plstm",
               "gin", "--seeds", "1", "--split", "scaffold", "--cache-dir", str(tmp_path / "c"),
               "--out", str(tmp_path / "cmp"), *TINY])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| plstm |" in text and "| gin |" in text and "test roc_auc" in text
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    res = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert {r["model"] for r in res["runs"]} == {"plstm", "gin"}
    assert res["runs"][0]["task"] == "classification"


def test_compare_repeats_train_each_split_from_other_initial_weights(tmp_path, capsys):
    """--repeats K: K runs per split seed with init seeds s, s + 1000, ...; the same split within a seed, other
    weights; the summary averages the repeats of a split first, then takes mean and std over splits."""
    data = _dataset(tmp_path)
    out = tmp_path / "rep"
    rc = main(["compare", "--csv", data, "--smiles-column", "smiles", "--target-column", "a", "--models", "gin",
               "--seeds", "2", "--seed", "3", "--repeats", "2", "--split", "random", "--cache-dir",
               str(tmp_path / "c"), "--out", str(out), *TINY])
    assert rc == 0
    assert "| gin | 2 × 2 |" in capsys.readouterr().out
    res = json.loads((out / "compare.json").read_text())
    assert sorted((r["seed"], r["init_seed"]) for r in res["runs"]) == [(3, 3), (3, 1003), (4, 4), (4, 1004)]
    per_split = [np.mean([r["test"]["rmse"] for r in res["runs"] if r["seed"] == s]) for s in (3, 4)]
    np.testing.assert_allclose(res["summary"]["gin"]["rmse"], [np.mean(per_split), np.std(per_split)])
    assert res["summary"]["gin"]["repeats"] == 2 and res["summary"]["gin"]["seeds"] == 2
    first, again = (json.loads((out / d / "split.json").read_text()) for d in ("gin-seed3", "gin-seed3-init1003"))
    assert first["test"]["rows"] == again["test"]["rows"] and first["train"]["rows"] == again["train"]["rows"]
    w1, w2 = (torch.load(out / d / "model.pt", weights_only=False)["state_dict"]
              for d in ("gin-seed3", "gin-seed3-init1003"))
    assert any(not torch.equal(w1[k], w2[k]) for k in w1 if w1[k].is_floating_point())
    cfg = json.loads((out / "gin-seed3-init1003" / "metrics.json").read_text())["config"]
    assert cfg["seed"] == 3 and cfg["init_seed"] == 1003


def test_init_seed_equal_to_seed_reproduces_the_default_run(tmp_path):
    """--init-seed defaults to --seed: giving it explicitly trains the same model to the same metrics."""
    data = _dataset(tmp_path)
    common = ["train", "--csv", data, "--smiles-column", "smiles", "--target-column", "a", "--model", "gin",
              "--seed", "2", "--split", "random", "--cache-dir", str(tmp_path / "c"), *TINY]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--init-seed", "2", "--out", str(tmp_path / "b")]) == 0
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in "ab")
    assert ma["test"] == mb["test"] and ma["val"] == mb["val"]


@pytest.mark.parametrize("model", ["plstm", "gin"])
def test_train_with_loader_workers(tmp_path, model):
    """--num-workers: the workers collate, prepare (pLSTM schedules) and pack; the run completes either way."""
    data = _dataset(tmp_path)
    out = tmp_path / model
    rc = main(["train", "--csv", data, "--smiles-column", "smiles", "--target-column", "a", "--model", model,
               "--num-workers", "1", "--cache-dir", str(tmp_path / "c"), "--out", str(out), *TINY])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(m["test"]["rmse"]) and m["config"]["num_workers"] == 1


def _err(capsys, argv):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse-level mistakes
        rc = e.code
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize("case", ["missing_file", "missing_column", "empty_csv", "header_only", "unknown_model",
                                  "bad_epochs", "zero_epochs", "bad_lr", "bad_dropout", "no_smiles_column",
                                  "missing_model_dir", "predict_missing_column", "both_inputs", "non_numeric",
                                  "bad_local_mix", "bad_layer_scale", "bad_plstm_lr_scale", "bad_init_seed",
                                  "zero_repeats"])
def test_user_mistakes_are_one_line_errors(case, tmp_path, capsys):
    data = _dataset(tmp_path)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    header = tmp_path / "header.csv"
    header.write_text("smiles,a\n")
    nonnum = tmp_path / "nonnum.csv"
    nonnum.write_text("smiles,a\nCCO,1\nCC,x\n")
    base = ["train", "--smiles-column", "smiles", "--target-column", "a", "--out", str(tmp_path / "o"), *TINY]
    argv = {
        "missing_file": ["train", "--csv", str(tmp_path / "nope.csv"), *base[1:]],
        "missing_column": ["train", "--csv", data, "--smiles-column", "smi", "--target-column", "a", *TINY],
        "empty_csv": ["train", "--csv", str(empty), *base[1:]],
        "header_only": ["train", "--csv", str(header), *base[1:]],
        "unknown_model": ["train", "--csv", data, *base[1:], "--model", "transformer"],
        "bad_epochs": ["train", "--csv", data, *base[1:], "--epochs", "ten"],
        "zero_epochs": ["train", "--csv", data, *base[1:], "--epochs", "0"],
        "bad_lr": ["train", "--csv", data, *base[1:], "--lr", "-1"],
        "bad_dropout": ["train", "--csv", data, *base[1:], "--dropout", "1.5"],
        "no_smiles_column": ["train", "--csv", data, "--target-column", "a", *TINY],
        "missing_model_dir": ["predict", "--model-dir", str(tmp_path / "nodir"), "--smiles", "CCO"],
        "predict_missing_column": ["predict", "--model-dir", str(tmp_path), "--csv", data, "--smiles-column", "x"],
        "both_inputs": ["predict", "--model-dir", str(tmp_path), "--smiles", "CCO", "--csv", data],
        "non_numeric": ["train", "--csv", str(nonnum), *base[1:]],
        "bad_local_mix": ["train", "--csv", data, *base[1:], "--local-mix", "maybe"],
        "bad_layer_scale": ["train", "--csv", data, *base[1:], "--layer-scale", "-0.1"],
        "bad_plstm_lr_scale": ["train", "--csv", data, *base[1:], "--plstm-lr-scale", "0"],
        "bad_init_seed": ["train", "--csv", data, *base[1:], "--init-seed", "-3"],
        "zero_repeats": ["compare", "--csv", data, *base[1:], "--models", "gin", "--repeats", "0"],
    }[case]
    rc, err = _err(capsys, argv)
    assert rc != 0, case
    assert "Traceback" not in err and len(err.splitlines()) == 1 and "error" in err, (case, err)
