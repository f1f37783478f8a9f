"""Layers (``nn.Module``): own parameters, call the functional operators in :mod:`plstm_graph.ops`."""
from .grid import MultiHeadRMSNorm, PLSTM2DLayer

__all__ = ["PLSTM2DLayer", "MultiHeadRMSNorm"]
