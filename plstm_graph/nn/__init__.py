"""Layers: pLSTM on DAGs (P/D modes), blocks and stacks, graph readouts."""
from .blocks import PLSTMGraphBlock, PLSTMGraphStack, default_pattern
from .graph import GraphGates, MultiHeadRMSNorm, PLSTMGraphLayer, p_normalize
from .readout import AttentionReadout, MeanReadout, SumReadout, make_readout

__all__ = [
    "PLSTMGraphLayer", "GraphGates", "MultiHeadRMSNorm", "p_normalize",
    "PLSTMGraphBlock", "PLSTMGraphStack", "default_pattern",
    "SumReadout", "MeanReadout", "AttentionReadout", "make_readout",
]
