"""Layers. Sequence layers: :class:`MultiScaleRetention` (RetNet) and :class:`PLSTM1DLayer`."""
from .sequence import MultiScaleRetention, PLSTM1DLayer

__all__ = ["MultiScaleRetention", "PLSTM1DLayer"]
