"""Peak GPU memory and time of forward+backward on a ~1M-edge DAG (issue 7: <= 8 GB): a batch of molecule-like
DAGs (``--graph molecules``, the triton ``graph`` strategy) or one connected layered random DAG (``--graph random``,
``plstm_graph.bench.graphs.random_dag``, the ``levels`` strategy with checkpoint pieces).

    python benchmarks/dag_memory.py --edges 1000000 --backend triton --recompute
    python benchmarks/dag_memory.py --graph random --depth 256 --backend triton --recompute
"""
import argparse
import time

import torch

from plstm_graph import compile_dag, plstm_dag
from plstm_graph.bench.graphs import molecule_like_batch, random_dag


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--edges", type=int, default=1_000_000)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--backend", default="triton")
    p.add_argument("--recompute", action="store_true")
    p.add_argument("--graph", choices=["molecules", "random"], default="molecules")
    p.add_argument("--depth", type=int, default=256, help="layers of the random DAG (fewer = wider levels)")
    args = p.parse_args()
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    if args.graph == "molecules":
        ei, n, gid = molecule_like_batch(max(1, args.edges // 28), seed=1)
        s = compile_dag(ei, n, "P", _graph_id=gid, _num_graphs=int(gid.max()) + 1).to(dev)
    else:
        ei, n = random_dag(args.edges, seed=2, depth=args.depth)
        s = compile_dag(ei, num_nodes=n).to(dev)
    print(f"{args.graph}: compiled in {time.perf_counter() - t0:.1f} s")
    h, d = args.heads, args.dim
    g = torch.Generator(device=dev).manual_seed(0)
    shapes = [(n, h, d), (n, h, d), (n, h, d), (s.num_edges, h), (s.num_line_edges, h), (s.num_edges, h), (n, h)]
    x = [torch.rand(*sh, device=dev, generator=g).requires_grad_() for sh in shapes]
    for it in range(3):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        y = plstm_dag(*x, s, backend=args.backend, recompute=args.recompute)
        y.square().mean().backward()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated()
    strategy = s.cache.get("triton_strategy", "")
    print(f"{args.graph}: {args.backend} {strategy} recompute={args.recompute}: {s.num_levels} levels, {s.num_edges} edges, {s.num_line_edges} line edges, H={h} "
          f"K=V={d}: fwd+bwd {dt * 1e3:.1f} ms, peak {peak / 2**30:.2f} GiB "
          f"(inputs+grads {base / 2**30:.2f} GiB; storing every fp32 edge state would take "
          f"{s.num_edges * h * d * d * 4 / 2**30:.1f} GiB)")


if __name__ == "__main__":
    main()
