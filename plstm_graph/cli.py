"""The ``plstm-graph`` command line.

Subcommands register themselves through ``add_parser(subparsers)`` functions of the modules that own
them; a user mistake ends in a one-line ``error: ...`` on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit code 2."""


def _cmd_info(args) -> int:
    import platform

    import torch

    import plstm_graph
    from plstm_graph.ops.dag import dag_backends

    def version(mod):
        try:
            m = __import__(mod)
            return getattr(m, "__version__", "installed")
        except Exception:  # noqa: BLE001 - any import failure means "not available"
            return "not installed"

    print(f"plstm-graph     {plstm_graph.__version__}")
    print(f"python          {platform.python_version()}")
    print(f"torch           {torch.__version__}")
    for mod in ("torch_geometric", "triton", "torch_scatter", "rdkit", "ogb", "lightning", "networkx"):
        print(f"{mod:<15} {version(mod)}")
    dev = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    print(f"device          {dev}")
    print(f"dag backends    {', '.join(dag_backends())}")
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark and print its table")
    bsub = p.add_subparsers(dest="bench", required=True)
    from plstm_graph.bench import dag as bench_dag

    bench_dag.add_parser(bsub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plstm-graph", description="pLSTM on DAGs, sequences and grids")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, available backends, device")
    p_info.set_defaults(func=_cmd_info)
    _add_bench(sub)
    from plstm_graph.train import cli as train_cli  # train / predict / compare (molecules)

    train_cli.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"plstm-graph: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("plstm-graph: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
