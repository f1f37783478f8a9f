"""Models built from :mod:`plstm_graph.nn`."""
from .graph import PLSTMGraphModel

__all__ = ["PLSTMGraphModel"]
