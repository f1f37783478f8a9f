"""Retention forward+backward: our chunkwise Triton kernels (``kernels/sequence_chunk.py``, what
``retention(..., backend="triton")`` runs) against our torch chunkwise path and flash-linear-attention's
``chunk_retention`` (when installed), plus (``--with-scan``) our Triton recurrent scan. Also checks, on the
device, that the Triton outputs and gradients agree with the float32 torch path (relative max error).

Shapes of issue 7: (B, T, H, K, V) = (8, 2048, 16, 128, 128), (4, 8192, 8, 128, 256), (1, 32768, 8, 128, 128);
fla's chunk_retention on an H200 takes 1.22 / 3.79 / 2.48 ms (fwd+bwd, bf16). Timing: median of ``--iters`` runs of
forward + ``o.backward(do)`` (a fixed random cotangent), synchronised after each.

    python benchmarks/retention_triton.py --device cuda
    python benchmarks/retention_triton.py --device cpu --small      # interpreter smoke test
"""
from __future__ import annotations

import argparse
import os
import time

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
p.add_argument("--small", action="store_true", help="tiny shapes (CPU interpreter smoke test)")
p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
p.add_argument("--iters", type=int, default=20)
p.add_argument("--chunk-size", type=int, default=64)
p.add_argument("--with-scan", action="store_true", help="also time the Triton recurrent scan (slow)")
p.add_argument("--no-torch", action="store_true", help="skip the torch chunkwise column (slow to time at T=32k)")
p.add_argument("--no-gated", action="store_true", help="skip the gated (data-dependent transition) table")
p.add_argument("--segment", type=int, default=None, help="force the state passes' segment length in chunks")
p.add_argument("--shapes", default=None, help="only these shapes, e.g. '4,8192,8,128,256;1,32768,8,128,128'")
p.add_argument("--no-fla", action="store_true", help="skip fla even if installed (its first calls autotune for minutes)")
ARGS = p.parse_args()
if ARGS.device == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from plstm_graph.kernels import sequence as kseq  # noqa: E402
from plstm_graph.kernels import sequence_chunk as kchunk  # noqa: E402
from plstm_graph.ops.sequence import retention, retention_gammas  # noqa: E402


def sync():
    if ARGS.device == "cuda":
        torch.cuda.synchronize()


def bench(fn, leaves, iters, backward=True):
    """Median ms of ``fn(*leaves)`` (+ ``out.backward(do)`` from one fixed random cotangent ``do`` of the output's
    shape and dtype, made before timing; every implementation is timed the same way)."""
    do = None

    def step():
        nonlocal do
        out = fn(*leaves)
        if backward:
            if do is None:
                do = torch.randn_like(out)
            out.backward(do)
            for x in leaves:
                x.grad = None
    step()  # compile / autotune
    step()
    sync()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        sync()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def agreement(q, k, v, cs):
    """Relative max error of Triton vs the float32 torch chunkwise path: output, final state, dq, dk, dv."""
    res = []
    for backend, dt in (("triton", q.dtype), ("torch", torch.float32)):
        leaves = [x.detach().to(dt).requires_grad_() for x in (q, k, v)]
        o, fin = retention(*leaves, output_final_state=True, chunk_size=cs, backend=backend)
        g = torch.Generator(device=q.device).manual_seed(1)
        do = torch.randn(o.shape, generator=g, device=q.device)
        dfin = torch.randn(fin.shape, generator=g, device=q.device)
        grads = torch.autograd.grad((o.float() * do).sum() + (fin * dfin).sum(), leaves)
        res.append([o.float(), fin.float()] + [x.float() for x in grads])
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item() for a, b in zip(*res))


def main():
    dev, dtype = torch.device(ARGS.device), getattr(torch, ARGS.dtype)
    shapes = [(8, 2048, 16, 128, 128), (4, 8192, 8, 128, 256), (1, 32768, 8, 128, 128)]
    iters, cs = ARGS.iters, ARGS.chunk_size
    if ARGS.small:
        shapes, iters, cs = [(1, 40, 2, 16, 32), (1, 70, 1, 32, 16)], 1, 16
    if ARGS.shapes:
        try:
            shapes = [tuple(int(x) for x in sh.split(",")) for sh in ARGS.shapes.split(";")]
            assert all(len(sh) == 5 for sh in shapes)
        except (ValueError, AssertionError):
            p.error(f"--shapes: expected 'B,T,H,K,V;...', got {ARGS.shapes!r}")
    try:
        if ARGS.no_fla:
            raise ImportError
        from fla.ops.retention import chunk_retention
    except ImportError:
        chunk_retention = None
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU interpreter"
    print(f"# {name}; dtype {ARGS.dtype}; chunk {cs}; fwd+bwd median ms; fla: "
          f"{'found' if chunk_retention is not None else 'not installed'}")
    cols = ["triton chunk", "triton chunk fwd", "torch chunkwise", "fla chunk_ret", "fla fwd", "fla/ours",
            "triton scan", "rel err"]
    print(f"{'B, T, H, K, V':<26}" + "".join(f"{c:>17}" for c in cols))
    nan = float("nan")
    for B, T, H, K, V in shapes:
        g = torch.Generator().manual_seed(0)
        q, k = (torch.randn(B, T, H, K, generator=g).to(dev, dtype).requires_grad_() for _ in range(2))
        v = torch.randn(B, T, H, V, generator=g).to(dev, dtype).requires_grad_()

        def ours(q, k, v):
            if ARGS.segment is not None:  # the kernel directly, retention's scale and gates spelled out
                one = torch.ones(B, T, H, device=q.device)
                tau = retention_gammas(H, device=q.device).expand(B, T, H)
                return kchunk.plstm_sequence_chunk_triton(q * K ** -0.5, k, v, one, tau, tau, one, chunk_size=cs,
                                                          segment=ARGS.segment)[0]
            return retention(q, k, v, chunk_size=cs, backend="triton")[0]

        def torch_chunk(q, k, v):
            return retention(q, k, v, chunk_size=cs, backend="torch")[0]

        row = {"triton chunk": bench(ours, [q, k, v], iters)}
        with torch.no_grad():
            row["triton chunk fwd"] = bench(ours, [q, k, v], iters, backward=False)
        try:
            if not ARGS.no_torch:
                row["torch chunkwise"] = bench(torch_chunk, [q, k, v], iters if dev.type == "cuda" else 1)
        except torch.cuda.OutOfMemoryError:
            row["torch chunkwise"] = nan
        if chunk_retention is not None and dev.type == "cuda":
            row["fla chunk_ret"] = bench(lambda q, k, v: chunk_retention(q, k, v)[0], [q, k, v], iters)
            with torch.no_grad():
                row["fla fwd"] = bench(lambda q, k, v: chunk_retention(q, k, v)[0], [q, k, v], iters, backward=False)
        row["fla/ours"] = row.get("fla chunk_ret", nan) / row["triton chunk"]
        if ARGS.with_scan or ARGS.small:
            gamma = 1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float32, device=dev))
            ones, tau = torch.ones(B, T, H, device=dev), gamma.expand(B, T, H).contiguous()

            def scan(q, k, v):
                return kseq.plstm_sequence_triton(q * K ** -0.5, k, v, ones, tau, tau, ones, strategy="scan")[0]
            row["triton scan"] = bench(scan, [q, k, v], iters)
        row["rel err"] = agreement(q, k, v, cs)
        cells = []
        for c in cols:
            x = row.get(c, nan)
            cells.append(f"{x:>17.3g}" if c in ("fla/ours", "rel err") else f"{x * 1e3:>17.2f}")
        print(f"{str((B, T, H, K, V)):<26}" + "".join(cells), flush=True)
    print("\n(fla/ours > 1: ours faster; rel err: max |triton - torch fp32| / max |torch fp32| over o, final "
          "state, dq, dk, dv)")
    if not ARGS.no_gated:
        gated(shapes, iters, cs, dev, dtype)


def gated(shapes, iters, cs, dev, dtype):
    """Data-dependent transitions (sigmoid of a learned logit, gradient included) against fla's
    chunk_simple_gla (same decay structure, decay applied one step later; timing only)."""
    from plstm_graph.ops.sequence import plstm_sequence

    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        chunk_simple_gla = None
    print("\n# gated: transition = sigmoid(logit) [B, T, H] with gradient; fwd+bwd median ms")
    print(f"{'B, T, H, K, V':<26}{'triton chunk':>17}{'torch chunkwise':>17}{'fla simple_gla':>17}{'fla/ours':>17}")
    for B, T, H, K, V in shapes:
        g = torch.Generator().manual_seed(1)
        q, k = (torch.randn(B, T, H, K, generator=g).to(dev, dtype).requires_grad_() for _ in range(2))
        v = torch.randn(B, T, H, V, generator=g).to(dev, dtype).requires_grad_()
        logit = (torch.randn(B, T, H, generator=g) + 4.0).to(dev).requires_grad_()
        ones = torch.ones(B, T, H, device=dev)
        scale = K ** -0.5

        def run(backend):
            def fn(q, k, v, logit):
                tau = torch.sigmoid(logit)
                return plstm_sequence(q, k, v, ones, tau, tau * scale, ones * scale, chunk_size=cs,
                                      backend=backend)[0]
            return fn
        row = [bench(run("triton"), [q, k, v, logit], iters)]
        try:
            row.append(bench(run("torch"), [q, k, v, logit], iters if dev.type == "cuda" else 1))
        except torch.cuda.OutOfMemoryError:
            row.append(float("nan"))
        fla_ms = float("nan")
        if chunk_simple_gla is not None and dev.type == "cuda":
            try:
                fla_ms = bench(lambda q, k, v, lg: chunk_simple_gla(q, k, v, g=torch.nn.functional.logsigmoid(lg),
                                                                    scale=scale)[0], [q, k, v, logit], iters)
            except Exception as e:  # an fla API change must not stop the table
                print(f"  (fla chunk_simple_gla failed: {type(e).__name__}: {e})")
        row += [fla_ms, fla_ms / row[0]]
        print(f"{str((B, T, H, K, V)):<26}" + "".join(f"{x * 1e3:>17.2f}" for x in row[:3]) + f"{row[3]:>17.3g}",
              flush=True)


if __name__ == "__main__":
    main()
