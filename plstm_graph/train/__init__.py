"""Training (PyTorch Lightning) and the molecule CLI commands.

The only floor, with ``plstm_graph.cli``, that imports Lightning; nothing is imported here eagerly, so
``plstm_graph.train.cli`` can register its subcommands without Lightning installed.
"""
