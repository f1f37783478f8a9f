"""Micro-benchmark of the grid operator's read-from-boundary Triton kernel (``kernels/grid.py``) at the 64x64
operator's shape (W = 4096 tiles of N = 64 nodes, A = 16 boundary edges, K = V = 32): contiguous ``C`` vs the
transposed ``C^T`` the backward passes read, without and with the weight-gradient output, for each node block
and dot precision; plus ``C^T.contiguous()`` and the scatter kernel. Mean ms of 20 calls.

    python benchmarks/grid_read_kernel.py            # CUDA only
"""
from __future__ import annotations

import time

import torch

from plstm_graph.kernels import grid as kg


def timed(fn, n=20):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def main():
    if not torch.cuda.is_available():
        raise SystemExit("this micro-benchmark needs a CUDA device")
    W, N, A, K, V = 4096, 64, 16, 32, 32
    dev = "cuda"
    M, x, u = torch.randn(W, N, A, device=dev), torch.randn(W, N, K, device=dev), torch.randn(W, N, V, device=dev)
    C = torch.randn(W, A, K, V, device=dev)
    Ct = torch.randn(W, A, V, K, device=dev).transpose(2, 3)
    g = torch.empty(W, N, A, device=dev)
    saved = kg.READ_BLOCK_N, kg.DOT_PRECISION
    try:
        for bn in (64, 32, 16):
            kg.READ_BLOCK_N = bn
            for prec in ("ieee", "tf32x3", "tf32"):
                kg.DOT_PRECISION = prec
                r = [timed(lambda: kg._read(M, x, C)), timed(lambda: kg._read(M, x, Ct)),
                     timed(lambda: kg._read(M, x, C, u=u, g=g)), timed(lambda: kg._read(M, x, Ct, u=u, g=g)),
                     timed(lambda: Ct.contiguous())]
                print(f"BN {bn} {prec}: plain C {r[0]:.3f} | plain C^T {r[1]:.3f} | wgrad C {r[2]:.3f} | "
                      f"wgrad C^T {r[3]:.3f} | C^T.contiguous {r[4]:.3f} ms")
        kg.READ_BLOCK_N, kg.DOT_PRECISION = saved
        S = torch.randn(W, N, A, device=dev).transpose(1, 2)
        print(f"scatter (default precision): {timed(lambda: kg._scatter(S, x, u)):.3f} ms")
    finally:
        kg.READ_BLOCK_N, kg.DOT_PRECISION = saved


if __name__ == "__main__":
    main()
