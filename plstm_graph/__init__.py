"""plstm-graph: pLSTM networks on arbitrary DAGs, sequences (RetNet) and grids.

Core entry points::

    schedule = plstm_graph.compile_dag(edge_index, num_nodes, mode="P")
    y = plstm_graph.plstm_dag(q, k, v, source, transition, mark, direct, schedule)
"""
from .graph import DAGSchedule, compile_dag
from .ops import dag_backends, grid_dag, plstm_dag, plstm_grid
from .ops.sequence import plstm_sequence, retention

__version__ = "0.1.0"

__all__ = [
    "compile_dag", "DAGSchedule", "plstm_dag", "dag_backends", "plstm_sequence", "retention", "plstm_grid",
    "grid_dag", "__version__",
]
