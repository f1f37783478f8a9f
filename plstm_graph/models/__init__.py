"""Models. Sequence: :class:`RetNetLM`."""
from .retnet import RetNetLM, RetNetState

__all__ = ["RetNetLM", "RetNetState"]
