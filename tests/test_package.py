"""Packaging and import hygiene: the layout promised by ARCHITECTURE.md and the issue."""
import pathlib
import subprocess
import sys
import tomllib

import pytest

import plstm_graph
from plstm_graph.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(cfg["tool"]["setuptools"]["packages"])
    mapping = cfg["tool"]["setuptools"]["package-dir"]
    found = set()
    for init in (ROOT / "plstm_graph").rglob("__init__.py"):
        found.add(".".join(init.parent.relative_to(ROOT).parts))
    for name, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name,) + rel))
    assert found <= listed, f"subpackages missing from pyproject packages: {sorted(found - listed)}"


def test_kernels_and_datasets_ship_inside_the_package():
    import plstm_graph.datasets
    import plstm_graph.kernels

    assert plstm_graph.kernels.__name__ == "plstm_graph.kernels"
    assert plstm_graph.datasets.__name__ == "plstm_graph.datasets"


def test_core_import_pulls_in_no_optional_dependency():
    code = (
        "import sys, plstm_graph, plstm_graph.graph, plstm_graph.ops;"
        "bad = [m for m in ('torch_geometric', 'triton', 'rdkit', 'lightning', 'ogb') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import plstm_graph imported {out.stdout.strip()}"


def test_cli_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert plstm_graph.__version__ in out and "dag backends" in out and "levels" in out


def test_cli_bench_dag_smoke(capsys):
    assert main(["bench", "dag", "--num-graphs", "4", "--repeats", "1", "--compile-sizes", "2000",
                 "--networkx-max", "2000"]) == 0
    out = capsys.readouterr().out
    assert "graphs/s" in out and "compile_dag time" in out


def test_cli_user_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as err:
        main(["bench", "dag", "--num-graphs", "many"])
    assert err.value.code == 2
    assert "invalid int value" in capsys.readouterr().err
