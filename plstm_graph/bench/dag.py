"""DAG operator benchmark: ``plstm-graph bench dag`` (also ``python benchmarks/dag.py``).

Prints, for one batch of 128 molecule-like DAGs (15-40 nodes, H=4, K=V=32, float32, forward+backward):
graphs/s of every ``plstm_dag`` backend, of the per-edge loop (the ``reference`` backend, timed on a
subset because it is slow), and of a 4-layer PyG GIN (hidden 128) on the same graphs; then the compile
time of 100k- and 1M-edge DAGs in both modes, next to networkx building the line graph and its
topological generations. Tests never assert on these numbers; the README quotes them.
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Callable, Dict, List

import torch

from .graphs import layered_dag, molecule_like_batch

__all__ = ["add_parser", "run_benchmark"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], None], device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _inputs(schedule, heads, dk, dv, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, e, l = schedule.num_nodes, schedule.num_edges, schedule.num_line_edges

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()

    return [r(n, heads, dk, scale=dk ** -0.5), r(n, heads, dk), r(n, heads, dv), torch.sigmoid(r(e, heads)).detach()
            .requires_grad_(), torch.tanh(r(l, heads)).detach().requires_grad_(), torch.sigmoid(r(e, heads)).detach()
            .requires_grad_(), torch.sigmoid(r(n, heads)).detach().requires_grad_()]


def _fwd_bwd(backend, inputs, schedule):
    from plstm_graph import plstm_dag

    def step():
        for t in inputs:
            t.grad = None
        y = plstm_dag(*inputs, schedule, backend=backend)
        y.float().square().mean().backward()

    return step


def _gin_step(edge_index, num_nodes, graph_id, num_graphs, device):
    from torch_geometric.nn import global_add_pool
    from torch_geometric.nn.models import GIN

    model = GIN(in_channels=32, hidden_channels=128, num_layers=4, out_channels=1).to(device)
    x = torch.randn(num_nodes, 32, device=device)
    ei, gid = edge_index.to(device), graph_id.to(device)

    def step():
        model.zero_grad(set_to_none=True)
        out = global_add_pool(model(x, ei), gid, size=num_graphs)
        out.square().mean().backward()

    return step


def run_benchmark(device: str = "cpu", num_graphs: int = 128, heads: int = 4, dim: int = 32, repeats: int = 5,
                  ref_graphs: int = 4, compile_sizes=(100_000, 1_000_000), networkx_max: int = 100_000,
                  backends: List[str] = None, mode: str = "P", dtype: str = "float32") -> Dict:
    from plstm_graph import compile_dag, dag_backends

    dev = torch.device(device)
    tdtype = getattr(torch, dtype)
    rows, results = [], {"device": str(dev), "num_graphs": num_graphs, "heads": heads, "dim": dim, "mode": mode}
    ei, n, gid = molecule_like_batch(num_graphs)
    t0 = time.perf_counter()
    sched = compile_dag(ei, n, mode, _graph_id=gid, _num_graphs=num_graphs)
    compile_batch_s = time.perf_counter() - t0
    sched = sched.to(dev)
    results["batch"] = dict(nodes=n, edges=sched.num_edges, line_edges=sched.num_line_edges, levels=sched.num_levels,
                            compile_s=compile_batch_s)
    backends = backends or [b for b in dag_backends() if b != "reference"]
    throughput = {}
    for b in backends:
        x = _inputs(sched, heads, dim, dim, dev, tdtype)
        t = _time(_fwd_bwd(b, x, sched), dev, repeats)
        throughput[b] = num_graphs / t
        rows.append((f"plstm_dag backend={b}", t * 1e3, num_graphs / t))
    # the per-edge loop (reference backend) on a few graphs: its cost is linear in edges
    ei_r, n_r, gid_r = molecule_like_batch(ref_graphs)
    s_r = compile_dag(ei_r, n_r, mode, _graph_id=gid_r, _num_graphs=ref_graphs).to(dev)
    x = _inputs(s_r, heads, dim, dim, dev, tdtype)
    t = _time(_fwd_bwd("reference", x, s_r), dev, max(1, repeats // 2), warmup=1)
    throughput["per-edge loop"] = ref_graphs / t
    rows.append((f"per-edge loop (reference, {ref_graphs} graphs)", t * 1e3, ref_graphs / t))
    t = _time(_gin_step(ei, n, gid, num_graphs, dev), dev, repeats)
    throughput["GIN"] = num_graphs / t
    rows.append(("PyG GIN, 4 layers, hidden 128", t * 1e3, num_graphs / t))
    results["throughput_graphs_per_s"] = throughput
    print(f"\nDAG operator, {num_graphs} molecule-like DAGs ({n} nodes, {sched.num_edges} edges, "
          f"{sched.num_line_edges} line edges, {sched.num_levels} levels), H={heads}, K=V={dim}, {dtype}, "
          f"mode {mode}, forward+backward on {dev}")
    print(f"{'what':<44} {'ms/batch':>10} {'graphs/s':>10} {'x loop':>8} {'x GIN':>7}")
    for name, ms, gps in rows:
        print(f"{name:<44} {ms:>10.2f} {gps:>10.1f} {gps / throughput['per-edge loop']:>8.1f} "
              f"{gps / throughput['GIN']:>7.2f}")
    # compile times
    comp = []
    for size in compile_sizes:
        for kind in ("molecules", "layered"):
            if kind == "molecules":
                e_ei, e_n, e_g = molecule_like_batch(max(1, size // 28), seed=1)
                kw = dict(_graph_id=e_g, _num_graphs=int(e_g.max()) + 1)
            else:
                e_ei, e_n = layered_dag(size)
                kw = {}
            entry = dict(kind=kind, edges=int(e_ei.shape[1]), nodes=int(e_n))
            for m in ("P", "D"):
                t0 = time.perf_counter()
                s = compile_dag(e_ei, e_n, m, **kw)
                entry[f"{m}_s"] = time.perf_counter() - t0
                entry[f"{m}_levels"] = s.num_levels
            if size <= networkx_max:
                entry["networkx_s"] = _networkx_compile(e_ei, e_n)
            comp.append(entry)
    results["compile"] = comp
    print("\ncompile_dag time (CPU, seconds; networkx = line_graph + topological_generations of it)")
    print(f"{'DAG':<28} {'edges':>9} {'P':>7} {'D':>7} {'networkx':>9} {'nx / P':>7} {'nx / D':>7}")
    for c in comp:
        nx_s = c.get("networkx_s")
        nx_txt = f"{nx_s:>9.2f} {nx_s / c['P_s']:>7.1f} {nx_s / c['D_s']:>7.1f}" if nx_s else f"{'-':>9} {'-':>7} {'-':>7}"
        print(f"{c['kind']:<28} {c['edges']:>9} {c['P_s']:>7.3f} {c['D_s']:>7.3f} {nx_txt}")
    return results


def _networkx_compile(edge_index, num_nodes) -> float:
    import networkx as nx

    t0 = time.perf_counter()
    g = nx.MultiDiGraph()
    g.add_nodes_from(range(num_nodes))
    g.add_edges_from(edge_index.T.tolist())
    lg = nx.line_graph(g)
    list(nx.topological_generations(lg))
    return time.perf_counter() - t0


def _cmd(args) -> int:
    from plstm_graph.cli import UserError

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    sizes = (10_000,) if args.quick else tuple(args.compile_sizes)
    res = run_benchmark(device=args.device, num_graphs=args.num_graphs, repeats=args.repeats,
                        compile_sizes=sizes, networkx_max=args.networkx_max, mode=args.mode,
                        backends=args.backends, dtype=args.dtype)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("dag", help="graphs/s of every DAG backend vs the per-edge loop and GIN; compile times")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-graphs", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mode", choices=["P", "D"], default="P")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--backends", nargs="+", default=None, help="default: every available backend")
    p.add_argument("--compile-sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--networkx-max", type=int, default=100_000,
                   help="largest DAG (edges) also compiled with networkx for comparison")
    p.add_argument("--quick", action="store_true", help="small compile sizes (smoke test)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.set_defaults(func=_cmd)
