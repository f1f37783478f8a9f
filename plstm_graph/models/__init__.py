"""Models built from :mod:`plstm_graph.nn` layers: graph model, RetNet LM, vision model (and ViT baseline)."""
from .graph import PLSTMGraphModel
from .retnet import RetNetLM, RetNetState
from .vision import PLSTMVisionModel, ViT

__all__ = ["PLSTMGraphModel", "RetNetLM", "RetNetState", "PLSTMVisionModel", "ViT"]
