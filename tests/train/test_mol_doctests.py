"""The runnable examples in the docstrings of the molecule modules."""
import doctest
import importlib

import pytest

pytest.importorskip("rdkit")


@pytest.mark.parametrize("module", [
    "plstm_graph.chem.featurize", "plstm_graph.datasets.molecules", "plstm_graph.datasets.splits",
    "plstm_graph.models.molecule", "plstm_graph.train.metrics", "plstm_graph.train.lightning",
])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
