"""Benchmark of the DAG operator and compiler; same as ``plstm-graph bench dag`` (see --help)."""
import sys

from plstm_graph.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "dag", *sys.argv[1:]]))
