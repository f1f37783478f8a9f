"""Peak GPU memory and time of forward+backward on one ~1M-edge batch of molecule-like DAGs (issue 7: <= 8 GB).

    python benchmarks/dag_memory.py --edges 1000000 --backend triton --recompute
"""
import argparse
import time

import torch

from plstm_graph import compile_dag, plstm_dag
from plstm_graph.bench.graphs import molecule_like_batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--edges", type=int, default=1_000_000)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--backend", default="triton")
    p.add_argument("--recompute", action="store_true")
    args = p.parse_args()
    dev = torch.device("cuda")
    ei, n, gid = molecule_like_batch(max(1, args.edges // 28), seed=1)
    s = compile_dag(ei, n, "P", _graph_id=gid, _num_graphs=int(gid.max()) + 1).to(dev)
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
    print(f"{args.backend} recompute={args.recompute}: {s.num_edges} edges, {s.num_line_edges} line edges, H={h} "
          f"K=V={d}: fwd+bwd {dt * 1e3:.1f} ms, peak {peak / 2**30:.2f} GiB "
          f"(inputs+grads {base / 2**30:.2f} GiB; storing every fp32 edge state would take "
          f"{s.num_edges * h * d * d * 4 / 2**30:.1f} GiB)")


if __name__ == "__main__":
    main()
