"""Models built from :mod:`plstm_graph.nn` layers."""
from .vision import PLSTMVisionModel, ViT

__all__ = ["PLSTMVisionModel", "ViT"]
