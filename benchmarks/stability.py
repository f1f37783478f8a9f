"""Stability of the pLSTM graph layer with saturated gates on square grid DAGs (issue 3, item 3).

Every weight of a ``PLSTMGraphLayer`` is multiplied by 8 and the gate biases set to +8, so sources,
marks and transitions sit at ~1: the regime in which a classic MD-LSTM explodes, because the number of
paths between two grid nodes grows like C(dx + dy, dx). For grids of growing side the script prints the
largest operator output (before the per-head norm, ``max_n |y_n|``) and the input-gradient norm of

* P-mode (per-node normalised sources and transitions, full line graph),
* D-mode (multitree line graph, |gates| <= 1),
* P-mode without the normalisation (``normalize=False``): the unbounded variant,

and writes a log-scale plot.

    python benchmarks/stability.py --sizes 5 10 20 30 40 --out docs/graph_layers_stability.png
"""
from __future__ import annotations

import argparse

import torch

from plstm_graph import compile_dag
from plstm_graph.nn import PLSTMGraphLayer


def grid_dag(side: int) -> torch.Tensor:
    idx = torch.arange(side * side).view(side, side)
    right = torch.stack([idx[:, :-1].reshape(-1), idx[:, 1:].reshape(-1)])
    down = torch.stack([idx[:-1, :].reshape(-1), idx[1:, :].reshape(-1)])
    return torch.cat([right, down], 1)


def saturate_(layer: PLSTMGraphLayer, factor: float = 8.0) -> None:
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(factor)
        for b in (layer.source_bias, layer.transition_bias, layer.mark_bias, layer.direct_bias):
            b.fill_(factor)


def measure(side: int, mode: str, normalize: bool, dim: int = 16, heads: int = 2, seed: int = 0):
    s = compile_dag(grid_dag(side), side * side, mode=mode)
    torch.manual_seed(seed)
    layer = PLSTMGraphLayer(dim, heads, mode=mode, normalize=normalize).double()
    saturate_(layer)
    x = torch.randn(side * side, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed),
                    requires_grad=True)
    y = layer.heads(x, s)  # [N, H, V], before the per-head norm
    out = float(y.detach().norm(dim=-1).max())
    y.norm(dim=-1).max().backward()
    return out, float(x.grad.norm())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 5, 10, 20, 30, 40])
    ap.add_argument("--out", default="docs/graph_layers_stability.png")
    args = ap.parse_args(argv)
    variants = [("P", True, "P (normalised)"), ("D", True, "D (multitree)"), ("P", False, "P unnormalised")]
    results = {name: [] for *_, name in variants}
    print("Largest operator output max_n |y_n| (and input-gradient norm) with saturated gates, float64, side x side grid")
    print()
    print("| grid | " + " | ".join(name for *_, name in variants) + " |")
    print("|---|" + "---|" * len(variants))
    for side in args.sizes:
        cells = []
        for mode, norm, name in variants:
            out, grad = measure(side, mode, norm)
            results[name].append((out, grad))
            cells.append(f"{out:.3g} ({grad:.3g})")
        print(f"| {side}x{side} | " + " | ".join(cells) + " |", flush=True)
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for name, vals in results.items():
            ax.semilogy(args.sizes, [v[0] for v in vals], marker="o", label=name)
        ax.set_xlabel("grid side (nodes per row)")
        ax.set_ylabel("max_n |y_n| (before per-head norm)")
        ax.set_title("pLSTM graph layer, saturated gates (weights x8)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out, dpi=120)
        print(f"\nplot written to {args.out}")


if __name__ == "__main__":
    main()
