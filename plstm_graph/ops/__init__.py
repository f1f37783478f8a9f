"""Functional operators: DAG (reference, levels, parallel), sequence, grid."""
from .dag import dag_backends, plstm_dag
from .grid import grid_backends, grid_dag, plstm_grid

__all__ = ["plstm_dag", "dag_backends", "plstm_grid", "grid_backends", "grid_dag"]
