"""Data loaders and generated tasks (installed as ``plstm_graph.datasets``)."""
