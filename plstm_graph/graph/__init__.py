"""DAG compilation: validation, orientation, line graph, D-mode multitree, level schedule, batching.

Importable with torch alone; the PyG batching helpers are loaded on first use.
"""
from .compile import compile_dag, orient_undirected
from .schedule import DAGSchedule

__all__ = [
    "compile_dag", "orient_undirected", "DAGSchedule",
    "DAGData", "attach_schedules", "AttachSchedules", "schedule_from_batch", "schedule_key", "prepare_batch",
    "schedule_requirements", "PackedBatch", "PrepareCollate",
]

_LAZY = {"DAGData", "attach_schedules", "AttachSchedules", "schedule_from_batch", "schedule_key", "prepare_batch",
         "schedule_requirements"}


def __getattr__(name):
    if name in ("PackedBatch", "PrepareCollate"):
        from . import collate

        return getattr(collate, name)
    if name in _LAZY:
        from . import batching

        return getattr(batching, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
