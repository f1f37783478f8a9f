"""Models built from :mod:`plstm_graph.nn` layers: RetNet LM, vision model (and ViT baseline)."""
from .retnet import RetNetLM, RetNetState
from .vision import PLSTMVisionModel, ViT

__all__ = ["RetNetLM", "RetNetState", "PLSTMVisionModel", "ViT"]
