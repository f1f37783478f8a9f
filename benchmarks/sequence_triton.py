"""Retention forward+backward: the Triton recurrent scan (``kernels/sequence.py``, strategy="scan"; see
benchmarks/retention_triton.py for the chunkwise kernels) against the torch chunkwise
path of ``plstm_sequence`` (when present) and flash-linear-attention's ``chunk_retention`` (when installed).

Retention is ``plstm_sequence(scale*q, k, v, source=1, transition=gamma, mark=gamma, direct=1)`` (SPEC 4).
Shapes of issue 7: (B, T, H, K, V) = (8, 2048, 16, 128, 128), (4, 8192, 8, 128, 256), (1, 32768, 8, 128, 128).

    python benchmarks/sequence_triton.py --device cuda
    python benchmarks/sequence_triton.py --device cpu --small      # interpreter smoke test
"""
from __future__ import annotations

import argparse
import os
import time

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
p.add_argument("--small", action="store_true")
p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
p.add_argument("--iters", type=int, default=10)
ARGS = p.parse_args()
if ARGS.device == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from plstm_graph.kernels import sequence as kseq  # noqa: E402


def sync():
    if ARGS.device == "cuda":
        torch.cuda.synchronize()


def bench(fn, leaves, iters):
    def step():
        out = fn(*leaves)
        out.float().sum().backward()
        for x in leaves:
            x.grad = None
    step()
    sync()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        sync()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def main():
    dev, dtype = torch.device(ARGS.device), getattr(torch, ARGS.dtype)
    shapes = [(8, 2048, 16, 128, 128), (4, 8192, 8, 128, 256), (1, 32768, 8, 128, 128)]
    iters = ARGS.iters
    if ARGS.small:
        shapes, iters = [(1, 8, 2, 8, 8)], 1
    try:
        from plstm_graph import plstm_sequence  # the seq branch
    except ImportError:
        plstm_sequence = None
    try:
        from fla.ops.retention import chunk_retention
    except ImportError:
        chunk_retention = None
    print(f"# {torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU interpreter'}; dtype {ARGS.dtype}")
    print(f"{'B, T, H, K, V':<28}{'triton scan ms':>16}{'torch chunkwise ms':>20}{'fla chunk_retention ms':>24}")
    for B, T, H, K, V in shapes:
        g = torch.Generator().manual_seed(0)
        q, k = (torch.randn(B, T, H, K, generator=g).to(dev, dtype).requires_grad_() for _ in range(2))
        v = torch.randn(B, T, H, V, generator=g).to(dev, dtype).requires_grad_()
        gamma = 1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float32, device=dev))
        ones = torch.ones(B, T, H, device=dev)
        tau = gamma.expand(B, T, H).contiguous()
        scale = K ** -0.5

        def triton_fn(q, k, v):
            return kseq.plstm_sequence_triton(q * scale, k, v, ones, tau, tau, ones, strategy="scan")[0]
        row = [bench(triton_fn, [q, k, v], iters)]
        if plstm_sequence is not None:
            row.append(bench(lambda q, k, v: plstm_sequence(q * scale, k, v, ones, tau, tau, ones)[0], [q, k, v], iters))
        else:
            row.append(float("nan"))
        if chunk_retention is not None and dev.type == "cuda":
            row.append(bench(lambda q, k, v: chunk_retention(q, k, v)[0], [q, k, v], iters))
        else:
            row.append(float("nan"))
        print(f"{str((B, T, H, K, V)):<28}{row[0] * 1e3:>16.2f}{row[1] * 1e3:>20.2f}{row[2] * 1e3:>24.2f}")

    print(f"\n{'decoding step B, H, K, V':<28}{'triton step us':>16}")
    steps = [(8, 16, 128, 128), (8, 8, 128, 256)] if not ARGS.small else [(2, 2, 8, 8)]
    for B, H, K, V in steps:
        q, k = (torch.randn(B, H, K, device=dev, dtype=dtype) for _ in range(2))
        v = torch.randn(B, H, V, device=dev, dtype=dtype)
        gates = [torch.rand(B, H, device=dev) for _ in range(4)]
        state = torch.zeros(B, H, K, V, device=dev)
        for _ in range(3):
            kseq.plstm_sequence_step_triton(q, k, v, *gates, state, out_state=state)
        sync()
        n = 100 if not ARGS.small else 1
        t0 = time.perf_counter()
        for _ in range(n):
            kseq.plstm_sequence_step_triton(q, k, v, *gates, state, out_state=state)
        sync()
        print(f"{str((B, H, K, V)):<28}{(time.perf_counter() - t0) / n * 1e6:>16.1f}")


if __name__ == "__main__":
    main()
