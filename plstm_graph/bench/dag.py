"""DAG operator benchmark (``plstm-graph bench dag`` / ``benchmarks/dag.py``). Filled in below."""


def add_parser(sub) -> None:
    p = sub.add_parser("dag", help="graphs/s of every DAG backend, compile time of large DAGs")
    p.set_defaults(func=lambda args: 0)
