"""Layers (``nn.Module``): own parameters, call the functional operators in :mod:`plstm_graph.ops`."""
from .grid import MultiHeadRMSNorm, PLSTM2DLayer
from .sequence import MultiScaleRetention, PLSTM1DLayer

__all__ = ["MultiScaleRetention", "PLSTM1DLayer", "PLSTM2DLayer", "MultiHeadRMSNorm"]
