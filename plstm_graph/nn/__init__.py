"""Layers (``nn.Module``): own parameters, call the functional operators in :mod:`plstm_graph.ops`.

Graph: :class:`PLSTMGraphLayer` (P/D modes), blocks and stacks, readouts. Sequence: :class:`MultiScaleRetention`
(RetNet), :class:`PLSTM1DLayer`. Grid: :class:`PLSTM2DLayer`.
"""
from .blocks import LocalBondMix, PLSTMGraphBlock, PLSTMGraphStack, default_pattern
from .graph import GraphGates, PLSTMGraphLayer, p_normalize
from .grid import PLSTM2DLayer
from .norm import MultiHeadRMSNorm, RMSNorm
from .readout import AttentionReadout, MeanReadout, SumReadout, make_readout
from .sequence import MultiScaleRetention, PLSTM1DLayer

__all__ = [
    "PLSTMGraphLayer", "GraphGates", "MultiHeadRMSNorm", "RMSNorm", "p_normalize",
    "PLSTMGraphBlock", "PLSTMGraphStack", "LocalBondMix", "default_pattern",
    "SumReadout", "MeanReadout", "AttentionReadout", "make_readout",
    "MultiScaleRetention", "PLSTM1DLayer", "PLSTM2DLayer",
]
