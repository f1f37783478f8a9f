"""Functional operators: DAG (reference, levels, parallel), sequence, grid."""
from .dag import dag_backends, plstm_dag

__all__ = ["plstm_dag", "dag_backends"]
