"""Speed and memory of the 2D-grid pLSTM operator (one orientation, float32, forward + backward).

Shapes and anchors: the public reference 2D implementation (ml-jku/plstm) measured on an NVIDIA H200:
16x16 with batch x heads = 192, K = V = 64: 150 ms; 32x32 with 64, K = V = 32: 200 ms; 64x64: 193-251 ms
(shape not stated; we use the 32x32 one: 64, K = V = 32); 128x128 has no anchor (memory check). Target: 20x.

    python benchmarks/grid.py                                  # CUDA, the four shapes, default tile
    python benchmarks/grid.py --tiles 4,8,16                   # sweep tile sizes
    python benchmarks/grid.py --device cpu --small             # CPU smoke run (smaller batches)
    python benchmarks/grid.py --sizes 64 --tiles 8 --profile   # + a torch.profiler table per row
    python benchmarks/grid.py --triton off                     # CUDA without the fused Triton kernels
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from plstm_graph.kernels import grid as kgrid
from plstm_graph.ops.grid import default_tile, plstm_grid

# (Y = X, batch x heads, K = V, anchor ms or None)
SHAPES = [(16, 192, 64, 150.0), (32, 64, 32, 200.0), (64, 64, 32, 193.0), (128, 64, 32, None)]
HEADS = 4


def inputs(side, bh, dk, device, requires_grad=True):
    B = bh // HEADS
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device).requires_grad_(requires_grad)  # noqa: E731
    q, k, v = (mk(B, side, side, HEADS, dk) for _ in range(3))
    gates = [torch.rand(B, side, side, HEADS, generator=g).to(device).requires_grad_(requires_grad) for _ in range(9)]
    return [q, k, v] + gates


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(fn, args, device, reps):
    def step():
        y = fn(*args)
        y.backward(torch.ones_like(y))
    for _ in range(2):
        step()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="divide batch x heads by 16 (CPU smoke run)")
    p.add_argument("--tiles", default="auto", help="comma list of tile sides, 'auto' = the default rule")
    p.add_argument("--sizes", default="16,32,64,128")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="wrap the operator in torch.compile")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    p.add_argument("--triton", choices=("auto", "on", "off"), default="auto",
                   help="fused Triton boundary kernels: auto (float32 CUDA), on (CPU needs TRITON_INTERPRET=1), off")
    p.add_argument("--dot-precision", choices=("ieee", "tf32x3", "tf32"), default=None,
                   help="tl.dot precision of the Triton kernels for float32 (default: kernels.grid.DOT_PRECISION)")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one fwd+bwd per row")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--no-check", action="store_true",
                   help="skip the error column (output and input gradients vs a float64 run of the torch path)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; use --device cpu --small")
    sizes = {int(s) for s in args.sizes.split(",")}
    use_triton = {"auto": None, "on": True, "off": False}[args.triton]
    if args.dot_precision:
        kgrid.DOT_PRECISION = args.dot_precision
    fn = plstm_grid
    if args.compile:
        fn = torch.compile(plstm_grid, dynamic=False)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"plstm_grid forward+backward, float32, one orientation, {HEADS} heads, device {name}, "
          f"Triton dot precision {kgrid.DOT_PRECISION}")
    print()
    print("| grid | batch x heads | K = V | tile | ms | peak MB | anchor ms | speed-up vs anchor | rel. err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for side, bh, dk, anchor in SHAPES:
        if side not in sizes:
            continue
        if args.small:
            bh = max(HEADS, bh // 16)
        tiles = [default_tile(side, side)[0]] if args.tiles == "auto" else [int(t) for t in args.tiles.split(",")]
        for tile in tiles:
            x = inputs(side, bh, dk, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                op = lambda *a: fn(*a, backend="tiled", tile=tile, use_triton=use_triton)  # noqa: E731
                ms = bench(op, x, device, args.reps)
            except torch.cuda.OutOfMemoryError:  # pragma: no cover - GPU only
                print(f"| {side}x{side} | {bh} | {dk} | {tile} | OOM | | | | |")
                continue
            mem = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
            ratio = f"{anchor / ms:.1f}x" if anchor and not args.small else "-"
            err = "-" if args.no_check else f"{rel_error(op, x, tile):.1e}"
            print(f"| {side}x{side} | {bh} | {dk} | {tile} | {ms:.2f} | {mem:.0f} | {anchor or '-'} | {ratio} | {err} |",
                  flush=True)
            if args.profile:
                profile(op, x, device, args.profile_rows, f"{side}x{side} tile {tile}")


def rel_error(op, x, tile) -> float:
    """Largest relative error (max abs error / max abs value) of the output and of the q, k, v and gate
    gradients of ``op`` against the torch tiled path in float64 (same tile), for one random cotangent."""
    g = torch.Generator(device="cpu").manual_seed(1)
    leaves = [t.detach().clone().requires_grad_(True) for t in x]
    ref_leaves = [t.detach().double().requires_grad_(True) for t in x]
    y = op(*leaves)
    y_ref = plstm_grid(*ref_leaves, backend="tiled", tile=tile, use_triton=False)
    w = torch.randn(y.shape, generator=g).to(y.device)
    grads = torch.autograd.grad((y * w).sum(), leaves)
    grads_ref = torch.autograd.grad((y_ref * w.double()).sum(), ref_leaves)
    rel = lambda a, b: ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()  # noqa: E731
    return max([rel(y, y_ref)] + [rel(a, b) for a, b in zip(grads, grads_ref)])


def profile(fn, args, device, rows, title):
    """A torch.profiler table of one forward+backward (after the warm-up runs of :func:`bench`)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        y = fn(*args)
        y.backward(torch.ones_like(y))
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(f"\n##### {title}: {len(prof.events())} profiler events")
    print(prof.key_averages().table(sort_by=key, row_limit=rows))
    print()


if __name__ == "__main__":
    main()
