"""The runnable examples in the docstrings of the graph layers, models, the long-range dataset and the paths backend."""
import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", [
    "plstm_graph.nn.graph", "plstm_graph.nn.blocks", "plstm_graph.nn.readout", "plstm_graph.models.graph",
    "plstm_graph.datasets.longrange", "plstm_graph.ops.dag.paths",
])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
