"""Speed and memory of the 2D-grid pLSTM operator (one orientation, float32, forward + backward).

Shapes and anchors: the public reference 2D implementation (ml-jku/plstm) measured on an NVIDIA H200:
16x16 with batch x heads = 192, K = V = 64: 150 ms; 32x32 with 64, K = V = 32: 200 ms; 64x64: 193-251 ms
(shape not stated; we use the 32x32 one: 64, K = V = 32); 128x128 has no anchor (memory check). Target: 20x.

    python benchmarks/grid.py                                  # CUDA, the four shapes, default tile
    python benchmarks/grid.py --tiles 4,8,16                   # sweep tile sizes
    python benchmarks/grid.py --device cpu --small             # CPU smoke run (smaller batches)
    python benchmarks/grid.py --sizes 64 --tiles 8 --profile   # + a torch.profiler table per row
    python benchmarks/grid.py --triton off                     # CUDA without the fused Triton kernels
    python benchmarks/grid.py --device cpu --small --count-ops # host work: ops, autograd nodes, launches
    TRITON_INTERPRET=1 python benchmarks/grid.py --device cpu --tiny --count-ops --triton on --reps 0  # CUDA path
    python benchmarks/grid.py --device cpu --tiny --reps 30 --no-check  # host time (BH = 4, K = V = 4)

``--count-ops`` runs one forward+backward under torch.profiler and counts what a GPU would launch: aten ops
that do work (the innermost op of each call chain that is not a view, metadata or an allocation), Triton
kernel launches (timed under the interpreter but counted as one launch each) and autograd nodes run by the
backward. On a GPU this operator is host-bound (launch overhead), so these counts track its wall time.
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
    p.add_argument("--tiny", action="store_true",
                   help=f"batch x heads = {HEADS}, K = V = 4: compute is negligible, the time is host overhead")
    p.add_argument("--count-ops", action="store_true",
                   help="per row: kernel-launching aten ops, Triton launches and autograd nodes of one fwd+bwd")
    p.add_argument("--tiles", default="auto", help="comma list of tile sides, 'auto' = the default rule")
    p.add_argument("--sizes", default="16,32,64,128")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions (median); 0 = no timing")
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
        if args.tiny:
            bh, dk = HEADS, 4
        tiles = [default_tile(side, side)[0]] if args.tiles == "auto" else [int(t) for t in args.tiles.split(",")]
        for tile in tiles:
            x = inputs(side, bh, dk, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                op = lambda *a: fn(*a, backend="tiled", tile=tile, use_triton=use_triton)  # noqa: E731
                ms = bench(op, x, device, args.reps) if args.reps else float("nan")
            except torch.cuda.OutOfMemoryError:  # pragma: no cover - GPU only
                print(f"| {side}x{side} | {bh} | {dk} | {tile} | OOM | | | | |")
                continue
            mem = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
            ratio = f"{anchor / ms:.1f}x" if anchor and not (args.small or args.tiny) and ms == ms else "-"
            err = "-" if args.no_check else f"{rel_error(op, x, tile):.1e}"
            print(f"| {side}x{side} | {bh} | {dk} | {tile} | {ms:.2f} | {mem:.0f} | {anchor or '-'} | {ratio} | {err} |",
                  flush=True)
            if args.profile:
                profile(op, x, device, args.profile_rows, f"{side}x{side} tile {tile}")
            if args.count_ops:
                print(f"  ops {side}x{side} tile {tile}: " + format_counts(count_ops(op, x, device)), flush=True)


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


# aten ops that launch no kernel: views, metadata, allocations (what they call, e.g. copy_ or fill_, is counted)
NO_LAUNCH = frozenset(
    "empty empty_strided empty_like new_empty new_empty_strided view _unsafe_view reshape _reshape_alias "
    "as_strided transpose t permute select slice unsqueeze squeeze expand expand_as alias detach detach_ unbind "
    "split split_with_sizes chunk narrow diagonal flatten unflatten view_as resolve_conj resolve_neg lift_fresh "
    "is_same_size result_type _has_compatible_shallow_copy_type set_ unfold movedim mT to contiguous "
    "numpy_T broadcast_to _nested_tensor_from_mask_left_aligned clone zero_ zeros zeros_like new_zeros "
    "ones_like resize_ promote_types".split())


def count_ops(fn, args, device) -> dict:
    """One forward+backward of ``fn(*args)`` (after a warm-up) under torch.profiler: ``ops`` = the aten ops
    that launch a kernel (an op counts when its name is not in :data:`NO_LAUNCH` and nothing it calls counts;
    so ``zeros -> zero_ -> fill_`` is one ``fill_``), ``triton`` = Triton kernel launches (what the CPU
    interpreter runs inside one is not counted), ``nodes`` = autograd nodes evaluated by the backward
    (without AccumulateGrad), ``by_name`` = ops per name."""
    from collections import Counter

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    from torch.profiler import record_function

    def step():
        y = fn(*args)
        y.backward(torch.ones_like(y))
    step()
    sync(device)
    orig_jit = kgrid._jit

    def counted_jit(kernel):  # tag every launch, so the interpreter's own tensor work is not counted as ops
        jitted = orig_jit(kernel)

        class Tagged:
            def __getitem__(self, grid):
                def launch(*a, **kw):
                    with record_function(f"triton::{kernel.__name__}"):
                        return jitted[grid](*a, **kw)
                return launch
        return Tagged()
    kgrid._jit = counted_jit
    try:
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
            sync(device)
    finally:
        kgrid._jit = orig_jit
    by_name, nodes, triton = Counter(), Counter(), 0

    def visit(ev) -> bool:  # True if ev or something it calls was counted
        nonlocal triton
        if ev.name.startswith("triton::"):
            triton += 1
            return True
        if ev.name.startswith("autograd::engine::evaluate_function: "):
            name = ev.name.split(": ", 1)[1]
            if name != "torch::autograd::AccumulateGrad":
                nodes[name] += 1
        below = [visit(c) for c in ev.cpu_children]
        if any(below):
            return True
        if ev.name.startswith("aten::") and ev.name[6:] not in NO_LAUNCH:
            by_name[ev.name[6:]] += 1
            return True
        return False
    for ev in prof.events():
        if ev.cpu_parent is None:
            visit(ev)
    return {"ops": sum(by_name.values()), "triton": triton, "nodes": sum(nodes.values()), "by_name": by_name,
            "node_names": nodes}


def format_counts(c: dict, top: int = 12) -> str:
    names = ", ".join(f"{n} {k}" for n, k in c["by_name"].most_common(top))
    return f"{c['ops']} aten ops + {c['triton']} Triton launches, {c['nodes']} autograd nodes ({names})"


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
