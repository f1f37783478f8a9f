"""Forward + backward time of a 4-layer PLSTMGraphStack on batches of random molecule-sized DAGs,
eager vs ``torch.compile`` (and optionally bf16 autocast), per backend.

The pLSTM operator itself always runs eagerly (the layer wraps it in ``torch.compiler.disable``: its
level loop is data-dependent); compilation covers projections, gates, norms and MLPs. Batches of
different sizes are used so that recompilation shows up (``dynamic=True``).

    python benchmarks/graph_layer_speed.py --device cpu --steps 5
    python benchmarks/graph_layer_speed.py --device cuda --backends levels,triton --amp
"""
from __future__ import annotations

import argparse
import time

import torch
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader

from plstm_graph.graph import attach_schedules
from plstm_graph.nn import PLSTMGraphStack


def molecule_like(n: int, gen: torch.Generator) -> Data:
    """A random tree plus ~n/8 ring-closing edges, oriented low id -> high id (a DAG)."""
    parent = torch.tensor([int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)])
    child = torch.arange(1, n)
    extra = torch.randint(0, n, (2, max(1, n // 8)), generator=gen)
    extra = extra[:, extra[0] != extra[1]]
    u = torch.cat([parent, extra.min(0).values])
    w = torch.cat([child, extra.max(0).values])
    ei = torch.unique(torch.stack([u, w]), dim=1)
    return attach_schedules(Data(edge_index=ei, num_nodes=n), modes=("P", "D"), reverse=True)


def timed(fn, steps: int, device) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()  # warm-up (and compilation)
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t) / steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", default="levels")
    ap.add_argument("--graphs", type=int, default=128, help="graphs per batch")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--amp", action="store_true", help="also time bf16 autocast")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    graphs = [molecule_like(int(torch.randint(8, 40, (1,), generator=gen)), gen) for _ in range(args.graphs * 2)]
    batches = [b.to(device) for b in DataLoader(graphs, batch_size=args.graphs)]
    print(f"device {device}, {args.graphs} graphs/batch, ~{batches[0].num_nodes} nodes, dim {args.dim}")
    print("| backend | mode | compile (s, first call) | step (ms) |")
    print("|---|---|---|---|")
    for backend in args.backends.split(","):
        stack = PLSTMGraphStack(args.dim, args.heads, num_layers=4, backend=backend).to(device)
        variants = [("eager", stack, False)]
        if args.amp:
            variants.append(("eager bf16", stack, True))
        variants.append(("compiled", torch.compile(stack, dynamic=True), False))
        for name, model, amp in variants:
            xs = [torch.randn(b.num_nodes, args.dim, device=device, requires_grad=True) for b in batches]
            state = {"i": 0}

            def step():
                i = state["i"] % len(batches)
                state["i"] += 1
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    y = model(xs[i], batches[i])
                y.float().square().mean().backward()

            t0 = time.perf_counter()
            step()
            step()  # both batch sizes once
            first = time.perf_counter() - t0
            ms = timed(step, args.steps, device) * 1e3
            print(f"| {backend} | {name} | {first:.1f} | {ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
