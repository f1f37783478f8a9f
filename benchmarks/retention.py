"""Benchmark: retention (chunkwise, PyTorch) vs flash-linear-attention, and the decoding step.

For each (B, T, H, K, V) it times the forward and forward+backward of
``plstm_graph.retention(mode="chunkwise")`` and, when ``fla`` is importable (benchmark-only, never a
runtime dependency), ``fla.ops.retention.chunk_retention`` on the same bf16 inputs, checks that the two
agree, and prints a table with ratios. Then it times one decoding step at batch 8: ours eagerly, ours
captured in a CUDA graph, and fla's ``fused_recurrent_retention`` on a length-1 sequence with a state.

    python benchmarks/retention.py                          # CUDA, bf16, the issue's three shapes
    python benchmarks/retention.py --device cpu --small     # tiny shapes, float32, runs anywhere

Timing: ``triton.testing.do_bench`` when available (CUDA), else CUDA events / perf_counter, with warmup;
the median of the repetitions is reported in milliseconds (the step in microseconds).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from plstm_graph import retention
from plstm_graph.ops.sequence import plstm_sequence_step, retention_gammas

FULL = [(8, 2048, 16, 128, 128), (4, 8192, 8, 128, 256), (1, 32768, 8, 128, 128)]
SMALL = [(2, 256, 4, 32, 32), (1, 1024, 2, 32, 64), (1, 4096, 2, 32, 32)]
FLA_ANCHOR_FWDBWD_MS = {FULL[0]: 1.22, FULL[1]: 3.79, FULL[2]: 2.48}  # measured on an H200 (issue 5)


def bench(fn, device: torch.device, warmup: int, rep: int) -> float:
    """Median milliseconds of ``fn()``."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
        except ImportError:
            pass
        for _ in range(max(3, warmup // 10)):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(max(5, rep // 10)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    for _ in range(2):
        fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def load_fla():
    try:
        from fla.ops.retention import chunk_retention, fused_recurrent_retention
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        print(f"(flash-linear-attention not importable: {type(exc).__name__}: {exc}; its columns are left empty)")
        return None, None
    import inspect

    def wrap(fn):
        takes_head_first = "head_first" in inspect.signature(fn).parameters
        return (lambda *a, **kw: fn(*a, head_first=False, **kw)) if takes_head_first else fn

    return wrap(chunk_retention), wrap(fused_recurrent_retention)


def make(shape, device, dtype, requires_grad):
    B, T, H, K, V = shape
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, T, H, K, device=device, dtype=dtype, generator=g)
    k = torch.randn(B, T, H, K, device=device, dtype=dtype, generator=g)
    v = torch.randn(B, T, H, V, device=device, dtype=dtype, generator=g)
    do = torch.randn(B, T, H, V, device=device, dtype=dtype, generator=g)
    return [x.requires_grad_(requires_grad) for x in (q, k, v)] + [do]


def fwd_bwd(op, q, k, v, do):
    def run():
        for x in (q, k, v):
            x.grad = None
        o, _ = op(q, k, v)
        o.backward(do)

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny shapes (for CPU smoke runs)")
    p.add_argument("--dtype", default=None, help="bfloat16 (CUDA default) or float32 (CPU default)")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=25, help="ms of warmup (do_bench)")
    p.add_argument("--rep", type=int, default=100, help="ms of repetitions (do_bench)")
    p.add_argument("--no-fla", action="store_true")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(retention)")
    p.add_argument("--decode-heads", type=int, default=None, help="H of the decoding step (default: first shape's)")
    p.add_argument("--decode-only", action="store_true", help="skip the chunkwise table, time the decoding step")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shapes = SMALL if args.small else FULL
    chunk_fla, recurrent_fla = (None, None) if args.no_fla else load_fla()
    if device.type != "cuda":
        chunk_fla = recurrent_fla = None
    ours = lambda q, k, v: retention(q, k, v, mode="chunkwise", chunk_size=args.chunk_size)  # noqa: E731
    variants = [("ours", ours)]
    if args.compile:
        variants.append(("ours+compile", torch.compile(ours)))
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {dev_name}   dtype: {dtype}   chunk_size: {args.chunk_size}   torch {torch.__version__}")

    rows = []
    for shape in ([] if args.decode_only else shapes):
        q, k, v, do = make(shape, device, dtype, requires_grad=True)
        row = {"shape": shape}
        for name, op in variants:
            try:
                with torch.no_grad():
                    row[f"{name}_fwd"] = bench(lambda: op(q, k, v), device, args.warmup, args.rep)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                row[f"{name}_fb"] = bench(fwd_bwd(op, q, k, v, do), device, args.warmup, args.rep)
                if device.type == "cuda":
                    row[f"{name}_mem"] = torch.cuda.max_memory_allocated() / 2**30
            except Exception as exc:  # noqa: BLE001 - report and continue with the other rows
                print(f"{name} failed at {shape}: {type(exc).__name__}: {exc}")
        if chunk_fla is not None:
            try:
                with torch.no_grad():
                    o_ours, s_ours = retention(q, k, v, output_final_state=True, chunk_size=args.chunk_size)
                    o_fla, s_fla = chunk_fla(q, k, v, output_final_state=True)
                    row["max_diff"] = (o_ours.float() - o_fla.float()).abs().max().item()
                    row["state_diff"] = (s_ours.float() - s_fla.float()).abs().max().item() / s_fla.abs().max().item()
                    del o_ours, s_ours, o_fla, s_fla
                    row["fla_fwd"] = bench(lambda: chunk_fla(q, k, v), device, args.warmup, args.rep)
                row["fla_fb"] = bench(fwd_bwd(chunk_fla, q, k, v, do), device, args.warmup, args.rep)
            except Exception as exc:  # noqa: BLE001 - report and continue
                print(f"fla failed at {shape}: {type(exc).__name__}: {exc}")
        rows.append(row)
        print(f"measured {row['shape']}: " + ", ".join(f"{k}={v:.3g}" for k, v in row.items() if k != "shape"), flush=True)
        del q, k, v, do
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def cell(x, fmt="{:.2f}"):
        return fmt.format(x) if x is not None else "-"

    names = [n for n, _ in variants]
    if args.decode_only:
        rows = []
    head = f"{'(B, T, H, K, V)':<26}"
    for n in names:
        head += f" {n + ' fwd':>14} {n + ' f+b':>14}"
    head += f" {'fla fwd':>9} {'fla f+b':>9} {'f+b ratio':>10} {'anchor':>7} {'peak GiB':>9} {'|o-o_fla|':>10} {'|dS|/|S|':>9}"
    if rows:
        print("\nchunkwise retention, milliseconds (f+b = forward + backward; ratio = ours / fla)")
        print(head)
    for r in rows:
        line = f"{str(r['shape']):<26}"
        for n in names:
            line += f" {cell(r.get(n + '_fwd')):>14} {cell(r.get(n + '_fb')):>14}"
        ratio = r["ours_fb"] / r["fla_fb"] if "fla_fb" in r and "ours_fb" in r else None
        anchor = FLA_ANCHOR_FWDBWD_MS.get(r["shape"])
        line += f" {cell(r.get('fla_fwd')):>9} {cell(r.get('fla_fb')):>9} {cell(ratio, '{:.2f}x'):>10}"
        line += f" {cell(anchor):>7} {cell(r.get('ours_mem')):>9} {cell(r.get('max_diff'), '{:.1e}'):>10} {cell(r.get('state_diff'), '{:.1e}'):>9}"
        print(line)
    if not args.small:
        print("anchor = fla chunk_retention f+b measured on an H200 (issue 5); target: ours within 3x")

    # ---------------------------------------------------------------- decoding step, batch 8
    B = 8
    H = args.decode_heads or shapes[0][2]
    K, V = shapes[0][3], shapes[0][4]
    g = torch.Generator(device=device).manual_seed(1)
    q, k = (torch.randn(B, H, K, device=device, dtype=dtype, generator=g) for _ in range(2))
    v = torch.randn(B, H, V, device=device, dtype=dtype, generator=g)
    state = torch.randn(B, H, K, V, device=device, dtype=torch.float32, generator=g)
    gamma = retention_gammas(H, device=device).expand(B, H)
    one = torch.ones_like(gamma)
    mark, direct = gamma * K ** -0.5, one * K ** -0.5  # the query scale, folded into mark and direct

    def step():
        return plstm_sequence_step(q, k, v, one, gamma, mark, direct, state)

    results = {}
    with torch.no_grad():
        results["ours (eager)"] = bench(step, device, args.warmup, args.rep) * 1e3
        if device.type == "cuda":
            static_state = state.clone()

            def update():  # the state lives in a static buffer; the graph replays step + copy
                y, new = plstm_sequence_step(q, k, v, one, gamma, mark, direct, static_state)
                static_state.copy_(new)
                return y

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    update()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                update()
            results["ours (CUDA graph)"] = bench(graph.replay, device, args.warmup, args.rep) * 1e3
            _, s_eager = step()
            static_state.copy_(state)
            graph.replay()
            torch.cuda.synchronize()
            print(f"\nCUDA-graph step agrees with eager: max |dS| = {(static_state - s_eager).abs().max().item():.1e}")
            try:
                from plstm_graph.kernels import sequence as kseq

                triton_ok = kseq.available()
            except ImportError:
                triton_ok = False
            if triton_ok:  # the fused Triton step: one launch, state updated in place
                tstate = state.clone()

                def tstep():
                    return kseq.plstm_sequence_step_triton(q, k, v, one, gamma, mark, direct, tstate,
                                                           out_state=tstate)

                results["ours Triton step (eager)"] = bench(tstep, device, args.warmup, args.rep) * 1e3
                for _ in range(3):
                    tstep()
                tgraph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(tgraph):
                    tstep()
                results["ours Triton step (CUDA graph)"] = bench(tgraph.replay, device, args.warmup,
                                                                 args.rep) * 1e3
                tstate.copy_(state)
                y_t, _ = tstep()
                y_e, s_e = step()
                print(f"Triton step agrees with eager: max |dy| = {(y_t.float() - y_e.float()).abs().max().item():.1e}"
                      f", max |dS| = {(tstate - s_e).abs().max().item():.1e}")
        if recurrent_fla is not None:
            q1, k1, v1 = q[:, None], k[:, None], v[:, None]
            results["fla fused_recurrent_retention"] = bench(
                lambda: recurrent_fla(q1, k1, v1, initial_state=state, output_final_state=True), device,
                args.warmup, args.rep,
            ) * 1e3
    print(f"\ndecoding step latency, batch {B}, H={H}, K={K}, V={V}, microseconds (target <= 50 us)")
    for name, us in results.items():
        print(f"  {name:<32} {us:10.1f}")


if __name__ == "__main__":
    main()
