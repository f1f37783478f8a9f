"""plstm-graph: pLSTM networks on arbitrary DAGs, sequences (RetNet) and grids.

Core entry points::

    schedule = plstm_graph.compile_dag(edge_index, num_nodes, mode="P")
    y = plstm_graph.plstm_dag(q, k, v, source, transition, mark, direct, schedule)
"""
from .graph import DAGSchedule, compile_dag
from .ops import dag_backends, plstm_dag
from .ops.sequence import plstm_sequence, retention

__version__ = "0.1.0"

__all__ = ["compile_dag", "DAGSchedule", "plstm_dag", "dag_backends", "plstm_sequence", "retention", "__version__"]
