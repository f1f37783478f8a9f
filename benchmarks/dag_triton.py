"""Triton DAG kernels: throughput on molecule batches and a scaling curve (issue 7).

Prints two tables and writes a PNG:

1. 128 molecule-like DAGs (15-40 nodes, H=4, K=V=32, forward+backward of ``plstm_dag``): graphs/s of the
   ``triton``, ``levels``, ``parallel`` and ``reference`` backends, and of a 4-layer PyG GIN (hidden 128)
   on the same batch (its undirected edges), all in one run.
2. Scaling: time and peak memory of forward+backward against edge count (1k .. 1M edges; unions of
   molecule-like DAGs, and optionally single random connected DAGs), ``triton`` with ``recompute=True``
   against ``levels``.

GPU (the numbers of the README):

    python benchmarks/dag_triton.py --device cuda --out runs/dag_triton

CPU smoke test (Triton interpreter, tiny sizes; numbers meaningless):

    python benchmarks/dag_triton.py --device cpu --small --out runs/dag_triton_cpu
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--small", action="store_true", help="tiny sizes (for the CPU interpreter)")
    p.add_argument("--graphs", type=int, default=128, help="graphs per molecule batch")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=32, help="K = V")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--max-edges", type=int, default=1_000_000, help="largest point of the scaling curve")
    p.add_argument("--levels-max-edges", type=int, default=1_000_000,
                   help="largest scaling point also run with backend='levels' (it stores every state)")
    p.add_argument("--random-dag", action="store_true",
                   help="scaling curve also on single connected random DAGs (levels strategy)")
    p.add_argument("--random-depth", type=int, default=256, help="levels of the random DAGs (fewer = wider)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default="runs/dag_triton", help="folder for the PNG and a CSV")
    p.add_argument("--scaling-only", action="store_true",
                   help="only the on-device check on the molecule batch and the scaling curve")
    p.add_argument("--replot", metavar="CSV", default=None,
                   help="only redraw the plot from a dag_triton_scaling.csv (into --out; no GPU needed)")
    return p.parse_args()


ARGS = _parse()
if ARGS.device == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402

from plstm_graph import compile_dag, plstm_dag  # noqa: E402
from plstm_graph.bench.graphs import random_dag  # noqa: E402


def molecule_edges(num_nodes: int, gen: torch.Generator):
    """A molecule-like DAG: a backbone where each atom bonds to one of the 3 previous ones (long chains,
    10-30 levels), plus ~1 ring closure per 6 atoms; edges point from the lower to the higher id."""
    edges = set()
    for i in range(1, num_nodes):
        j = i - 1 - int(torch.randint(0, min(3, i), (1,), generator=gen))
        edges.add((j, i))
    for _ in range(num_nodes // 6):
        i = int(torch.randint(2, num_nodes, (1,), generator=gen))
        j = int(torch.randint(max(0, i - 6), i - 1, (1,), generator=gen))
        edges.add((j, i))
    return sorted(edges)


def molecule_batch(num_graphs: int, lo: int, hi: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rows, off = [], 0
    for _ in range(num_graphs):
        n = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        rows += [(a + off, b + off) for a, b in molecule_edges(n, gen)]
        off += n
    return torch.tensor(rows, dtype=torch.long).t().reshape(2, -1), off


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def make_inputs(s, H, D, dtype, dev, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    N, E, L = s.num_nodes, s.num_edges, s.num_line_edges
    mk = lambda *sh, scale=1.0: (torch.randn(*sh, generator=g) * scale).to(dev, dtype).requires_grad_()  # noqa
    q, k, v = mk(N, H, D, scale=D ** -0.5), mk(N, H, D), mk(N, H, D)
    gate = lambda *sh: torch.sigmoid(torch.randn(*sh, generator=g)).mul(0.5).to(dev, dtype).requires_grad_()  # noqa
    return [q, k, v, gate(E, H), gate(L, H), gate(E, H), gate(N, H)]


def time_fwd_bwd(fn, xs, dev, iters, warmup=2):
    """Median seconds of forward + backward (after warm-up runs) and peak allocated bytes (inputs included)."""
    def step():
        y = fn(*xs)
        y.backward(torch.ones_like(y))
        for x in xs:
            x.grad = None
    for _ in range(warmup if not ARGS.small else 0):
        step()
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # the peak below includes the inputs (and the model)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        sync(dev)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else float("nan")
    times.sort()
    return times[len(times) // 2], peak


def gin_runner(ei, n, num_graphs, dev, hidden=128):
    from torch_geometric.nn import GIN, global_add_pool

    model = GIN(in_channels=hidden, hidden_channels=hidden, num_layers=4, out_channels=hidden).to(dev)
    und = torch.cat([ei, ei.flip(0)], 1).to(dev)
    x = torch.randn(n, hidden, device=dev, requires_grad=True)
    sizes = torch.bincount(compile_dag(ei, num_nodes=n).graph_id)
    batch = torch.repeat_interleave(torch.arange(sizes.numel()), sizes).to(dev)

    def fn(x):
        return global_add_pool(model(x, und), batch, size=num_graphs)
    return fn, [x]


def check(s, H, D, dev, label):
    """Triton (both strategies, with and without recomputation) against backend='levels' in float64-accurate
    float32: outputs and all input gradients. Exits non-zero on a mismatch (a kernel bug on this GPU)."""
    from plstm_graph.kernels import dag as kdag

    xs = make_inputs(s, H, D, torch.float32, dev, gen_seed=5)
    ref_in = [x.detach().double().requires_grad_() for x in xs]
    y_ref = plstm_dag(*ref_in, s, backend="levels")
    dy = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad(y_ref, ref_in, dy)
    worst = 0.0
    variants = [("graph", False), ("graph", True), ("levels", False), ("levels", True)]
    for strategy, rec in variants:
        if strategy == "graph" and s.num_edges > 200_000:
            continue  # a graph walk of one big component would be sequential
        kw = dict(strategy=strategy, recompute=rec)
        if rec:
            kw["chunk_bytes"] = max(1, s.num_edges // 7) * H * D * D * 4  # force several chunks / segments
        y = kdag.plstm_dag_triton(*xs, s, **kw)
        g = torch.autograd.grad(y, xs, dy.float())
        for a, b in zip((y,) + g, (y_ref,) + g_ref):
            err = ((a.double() - b).abs().max() / (b.abs().max() + 1e-9)).item() if b.numel() else 0.0
            worst = max(worst, err)
    status = "ok" if worst < 1e-4 else "MISMATCH"
    print(f"check {label}: triton vs levels, outputs + 7 gradients, max relative error {worst:.2e}: {status}")
    if status != "ok":
        sys.exit(1)


def main():
    if ARGS.replot:
        os.makedirs(ARGS.out, exist_ok=True)
        plot_curve(read_curve(ARGS.replot), os.path.join(ARGS.out, "dag_triton_scaling.png"), ARGS.heads, ARGS.dim)
        return
    dev = torch.device(ARGS.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but CUDA is not available; use --device cpu --small")
    dtype = getattr(torch, ARGS.dtype)
    H, D = ARGS.heads, ARGS.dim
    G, iters = ARGS.graphs, ARGS.iters
    scaling = [1_000 * 4 ** i for i in range(5)] + [1_000_000]  # 1k, 4k, 16k, 64k, 256k, 1M
    scaling = [e for e in scaling if e <= ARGS.max_edges]
    if ARGS.small:
        H, D, G, iters = 2, 8, 2, 1
        scaling = [40, 120]
    os.makedirs(ARGS.out, exist_ok=True)
    info = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (Triton interpreter)"
    print(f"# device: {info}; torch {torch.__version__}; H={H} K=V={D} dtype={ARGS.dtype}")

    # ---------------------------------------------------------------- 0. correctness on this device
    ei, n = molecule_batch(G, 15, 40)
    s = compile_dag(ei, num_nodes=n).to(dev)
    check(s, H, D, dev, f"{G} molecules")
    if not ARGS.small and not ARGS.scaling_only:
        ei_r, n_r = random_dag(20_000, depth=32)
        check(compile_dag(ei_r, num_nodes=n_r).to(dev), H, D, dev, "random DAG, 20k edges")

    # ---------------------------------------------------------------- 1. molecule batch throughput
    if not ARGS.scaling_only:
        throughput(s, ei, n, H, D, G, dtype, dev, iters)
    scaling_curve(scaling, H, D, dtype, dev, iters)


def throughput(s, ei, n, H, D, G, dtype, dev, iters):
    print(f"\n## {G} molecule-like DAGs: {n} nodes, {s.num_edges} edges, {s.num_line_edges} line edges, "
          f"{s.num_levels} levels; forward+backward")
    print(f"{'backend':<22}{'ms / batch':>12}{'graphs/s':>14}{'peak MB':>10}")
    rows = []
    runs = [("triton", {}), ("triton recompute", {"recompute": True}), ("levels", {}), ("parallel", {})]
    for name, kw in runs:
        backend = name.split()[0]
        xs = make_inputs(s, H, D, dtype, dev)
        fn = lambda *a, b=backend, kw=kw: plstm_dag(*a, s, backend=b, **kw)  # noqa: E731
        t, peak = time_fwd_bwd(fn, xs, dev, iters)
        rows.append((name, t, G / t, peak))
    # the per-edge reference is slow: time it on a few graphs and report graphs/s
    g_ref = 4 if not ARGS.small else 1
    ei_r, n_r = molecule_batch(g_ref, 15, 40, seed=1)
    s_r = compile_dag(ei_r, num_nodes=n_r).to(dev)
    t, peak = time_fwd_bwd(lambda *a: plstm_dag(*a, s_r, backend="reference"), make_inputs(s_r, H, D, dtype, dev),
                           dev, max(1, min(iters, 3)))
    rows.append((f"reference ({g_ref} graphs)", t * G / g_ref, g_ref / t, peak))
    try:
        fn, xs = gin_runner(ei, n, G, dev)
        t, peak = time_fwd_bwd(fn, xs, dev, iters)
        rows.append(("PyG GIN 4x128", t, G / t, peak))
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"(GIN skipped: {e})")
    for name, t, gps, peak in rows:
        print(f"{name:<22}{t * 1e3:>12.3f}{gps:>14,.0f}{peak / 2**20:>10.1f}")



def scaling_curve(scaling, H, D, dtype, dev, iters):
    # ---------------------------------------------------------------- 2. scaling curve
    print("\n## scaling: forward+backward vs edge count")
    print(f"{'graph':<11}{'edges':>9}{'levels':>8}  {'backend':<24}{'ms':>11}{'peak MB':>11}")
    curve = []
    kinds = ["molecules"] + (["random"] if ARGS.random_dag else [])
    for kind in kinds:
        for target in scaling:
            if kind == "molecules":
                ei, n = molecule_batch(max(1, round(target / 29)), 15, 40, seed=2)
            else:
                ei, n = random_dag(target, seed=2, depth=ARGS.random_depth)
            s = compile_dag(ei, num_nodes=n).to(dev)
            for name, kw in [("triton recompute", {"recompute": True}), ("levels", {})]:
                backend = name.split()[0]
                if backend == "levels" and s.num_edges > ARGS.levels_max_edges:
                    continue
                xs = make_inputs(s, H, D, dtype, dev)
                fn = lambda *a, b=backend, kw=kw: plstm_dag(*a, s, backend=b, **kw)  # noqa: E731
                try:
                    t, peak = time_fwd_bwd(fn, xs, dev, max(1, min(iters, 5)))
                except torch.cuda.OutOfMemoryError:
                    t, peak = float("nan"), float("nan")
                strategy = s.cache.get("triton_strategy", "") if backend == "triton" else ""
                label = f"{name} {strategy}".strip()
                curve.append((kind, s.num_edges, s.num_levels, label, t, peak))
                print(f"{kind:<11}{s.num_edges:>9}{s.num_levels:>8}  {label:<24}{t * 1e3:>11.2f}{peak / 2**20:>11.1f}")
                del xs
                gc.collect()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    with open(os.path.join(ARGS.out, "dag_triton_scaling.csv"), "w") as f:
        f.write("graph,edges,levels,backend,ms,peak_mb\n")
        for kind, e, lv, label, t, peak in curve:
            f.write(f"{kind},{e},{lv},{label},{t * 1e3:.4f},{peak / 2**20:.2f}\n")
    plot_curve(curve, os.path.join(ARGS.out, "dag_triton_scaling.png"), H, D, memory=dev.type == "cuda")


def read_curve(path):
    """The rows of a ``dag_triton_scaling.csv`` as written above (times back in seconds, peaks in bytes)."""
    import csv

    with open(path) as f:
        return [(r["graph"], int(r["edges"]), int(r["levels"]), r["backend"], float(r["ms"]) / 1e3,
                 float(r["peak_mb"]) * 2**20) for r in csv.DictReader(f)]


def plot_curve(curve, path, H, D, memory=True):
    """Time and peak memory against edge count, one line per (graph kind, backend); the 8 GB target dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib missing: no plot)")
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for kind in dict.fromkeys(c[0] for c in curve):
        for label in sorted({c[3] for c in curve if c[0] == kind}):
            pts = [c for c in curve if c[0] == kind and c[3] == label and not math.isnan(c[4])]
            if not pts:
                continue
            a1.loglog([p[1] for p in pts], [p[4] * 1e3 for p in pts], "o-", label=f"{kind}: {label}")
            if memory:
                a2.loglog([p[1] for p in pts], [p[5] / 2**20 for p in pts], "o-", label=f"{kind}: {label}")
    a1.set(xlabel="edges", ylabel="forward+backward ms", title=f"time (H={H}, K=V={D})")
    a2.set(xlabel="edges", ylabel="peak MiB", title="peak memory (CUDA)")
    a1.legend(fontsize=7)
    if memory:
        a2.axhline(8e9 / 2**20, ls="--", color="gray", lw=1, label="8 GB target (issue 7)")
        a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
