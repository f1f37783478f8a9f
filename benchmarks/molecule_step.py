"""Where the time of one molecule training step goes: pLSTM vs GIN, per phase, and host<->device syncs.

    # on the GPU (what the throughput target is about)
    python benchmarks/molecule_step.py --device cuda
    # the CPU proxy (aten ops per step, CPU time); also A/B the batch preparation
    OMP_NUM_THREADS=1 python benchmarks/molecule_step.py --device cpu --max-molecules 256
    python benchmarks/molecule_step.py --device cuda --prepare off     # the old path: batch.to(device)
    python benchmarks/molecule_step.py --device cuda --num-workers 2   # collate + prepare + pack in loader workers

For each model it prints

* **phases** (ms per step, medians; the device is synchronised between phases, so each phase is charged
  its own GPU work): ``load`` (DataLoader collation), ``prepare`` (``prepare_batch``: schedules and Triton
  plans built on the CPU, then moved; plain ``batch.to`` for GIN and with ``--prepare off``; with
  ``--num-workers N`` the workers collate, prepare and pack every batch of both models, ``load`` is the wait
  for the next one and ``prepare`` the copy and unpacking), ``forward``
  (model + loss), ``backward``, ``optimizer`` (clip, AdamW step, zero_grad);
* **step** (ms per step, no synchronisation inside the step: the number that throughput sees);
* **counts per step** from ``torch.profiler``: ``aten::`` ops (CPU; all, and without views / empty
  allocations, i.e. roughly the ops that launch a kernel), and on CUDA ``cudaStreamSynchronize``,
  ``cudaMemcpyAsync``, ``cudaLaunchKernel``, plus the warnings of ``torch.cuda.set_sync_debug_mode("warn")``
  (syncs torch itself knows about: ``.item()``, ``.cpu()``, ``nonzero``, ...).

The model is the CLI's default molecule model (hidden 64, 4 layers, 4 heads, dropout 0.1, mean+sum readout),
AdamW with gradient clipping 1.0, bf16 autocast on CUDA, FreeSolv batches of 32 (shuffled, fixed seed).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections import Counter

os.environ.setdefault("OUTDATED_IGNORE", "1")


# ops that never launch a kernel (views, metadata): left out of the second op count
_VIEW_OPS = {f"aten::{k}" for k in (
    "as_strided", "view", "reshape", "select", "slice", "t", "transpose", "permute", "expand", "expand_as",
    "unsqueeze", "squeeze", "detach", "alias", "resolve_conj", "resolve_neg", "lift_fresh", "_unsafe_view",
    "unbind", "split", "narrow", "view_as", "contiguous", "result_type", "empty", "empty_strided", "empty_like",
    "new_empty", "_reshape_alias", "flatten", "chunk", "split_with_sizes", "is_nonzero", "size", "stride")}


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _move(batch, model, device, prepare: bool):
    from plstm_graph.graph import PackedBatch

    if isinstance(batch, PackedBatch):  # from a loader worker (--num-workers)
        return batch.unpack(device)
    if prepare and model.model_name == "plstm":
        from plstm_graph.graph import prepare_batch

        return prepare_batch(batch, device, keys=model)
    return batch.to(device, non_blocking=True)


def _loss(out, y):
    import torch

    y = y.float()
    mask = ~torch.isnan(y)  # torch.where, not y[mask]: boolean indexing syncs with the host
    return torch.where(mask, (out.float() - torch.where(mask, y, 0.0)) ** 2, 0.0).sum() / mask.sum().clamp(min=1)


def _step(model, opt, batch, device, prepare, amp, marks=None):
    """One training step; ``marks`` (a list) gets a timestamp after every phase (device synchronised)."""
    import torch

    def mark():
        if marks is not None:
            _sync(device)
            marks.append(time.perf_counter())

    b = _move(batch, model, device, prepare)
    mark()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(b)
    loss = _loss(out, b.y)
    mark()
    loss.backward()
    mark()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    mark()
    return loss


def run_model(name, graphs, args, device):
    import torch
    from torch_geometric.loader import DataLoader

    from plstm_graph.models.molecule import MoleculeModel

    torch.manual_seed(0)
    base = name.split("-")[0]
    model = MoleculeModel(base, hidden=args.hidden, num_layers=args.layers, num_heads=args.heads,
                          dropout=0.1).to(device)
    if name == "plstm-readable":  # A/B: the readable torch gates instead of the fused Triton gate kernels
        from plstm_graph.nn import PLSTMGraphLayer

        for m in model.modules():
            if isinstance(m, PLSTMGraphLayer):
                m.fused_gates = False
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    amp = device.type == "cuda"
    prepare = args.prepare == "on"
    if args.num_workers:
        from plstm_graph.graph import PrepareCollate

        collate = PrepareCollate(graphs, keys=model if base == "plstm" else (), device=device)
        loader = torch.utils.data.DataLoader(graphs, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                             generator=torch.Generator().manual_seed(0), collate_fn=collate,
                                             num_workers=args.num_workers, persistent_workers=True,
                                             pin_memory=device.type == "cuda")
    else:
        loader = DataLoader(graphs, batch_size=args.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(0), drop_last=True)

    def batches(n):
        while True:
            for b in loader:
                if n <= 0:
                    return
                n -= 1
                yield b

    for b in batches(args.warmup):  # allocator, Triton compilation, lazy init
        _step(model, opt, b, device, prepare, amp)
    _sync(device)

    # phases, synchronised
    phases = {k: [] for k in ("load", "prepare", "forward", "backward", "optimizer")}
    it = batches(args.steps)
    while True:
        t0 = time.perf_counter()
        try:
            b = next(it)
        except StopIteration:
            break
        marks = [time.perf_counter()]
        _step(model, opt, b, device, prepare, amp, marks)
        phases["load"].append(marks[0] - t0)
        for k, (a, c) in zip(list(phases)[1:], zip(marks[:-1], marks[1:])):
            phases[k].append(c - a)
    # whole steps, not synchronised inside (what an epoch sees), batches collated beforehand
    pre = list(batches(args.steps))
    _sync(device)
    t = time.perf_counter()
    for b in pre:
        _step(model, opt, b, device, prepare, amp)
    _sync(device)
    step_ms = 1e3 * (time.perf_counter() - t) / max(len(pre), 1)

    # counts per step
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof_batches = list(batches(args.profile_steps))
    n_warn = 0
    with profile(activities=acts) as prof:
        for b in prof_batches:
            _step(model, opt, b, device, prepare, amp)
        _sync(device)
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                for b in prof_batches:
                    _step(model, opt, b, device, prepare, amp)
            n_warn = len(rec)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    names = Counter(e.name for e in prof.events())
    n = max(len(prof_batches), 1)
    aten = {k: c for k, c in names.items() if k.startswith("aten::")}
    counts = {"aten ops": sum(aten.values()) / n,
              "aten ops w/o views": sum(c for k, c in aten.items() if k not in _VIEW_OPS) / n}
    if device.type == "cuda":
        for k in ("cudaStreamSynchronize", "cudaMemcpyAsync", "cudaLaunchKernel"):
            counts[k] = sum(c for name_, c in names.items() if name_.startswith(k)) / n
        counts["sync warnings"] = n_warn / n
        try:  # kernel time: self device time of every event (kernels are their own events)
            gpu_us = sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages())
        except Exception:  # an older / newer profiler API
            gpu_us = float("nan")
        counts["GPU kernel ms"] = gpu_us / 1e3 / n
    med = {k: 1e3 * statistics.median(v) for k, v in phases.items()}
    return med, step_ms, counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dataset", default="freesolv")
    p.add_argument("--models", nargs="+", default=["plstm", "gin"],
                   help="plstm, gin, ...; plstm-readable: pLSTM with the readable torch gates (fused_gates=False)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--max-molecules", type=int, default=None)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--profile-steps", type=int, default=4)
    p.add_argument("--prepare", choices=("on", "off"), default="on",
                   help="pLSTM batches: plstm_graph.graph.prepare_batch (on) or plain batch.to (off)")
    p.add_argument("--num-workers", type=int, default=0,
                   help="loader workers (persistent) that collate, prepare and pack every batch of both models "
                        "(plstm_graph.graph.PrepareCollate); 0: in the main process")
    args = p.parse_args(argv)

    import torch

    from plstm_graph.datasets.molecules import build_graphs, load_dataset

    device = torch.device(args.device)
    if args.prepare == "on":
        try:
            from plstm_graph.graph import prepare_batch  # noqa: F401
        except ImportError:  # an older checkout
            print("(prepare_batch not available here: --prepare off)")
            args.prepare = "off"
    graphs = build_graphs(load_dataset(args.dataset), progress=False, warn=False).graphs
    if args.max_molecules:
        graphs = graphs[: args.max_molecules]
    print(f"{args.dataset}: {len(graphs)} molecules, batch {args.batch_size}, hidden {args.hidden}, {args.layers} "
          f"layers, device {device}{' (bf16 autocast)' if device.type == 'cuda' else ''}, "
          f"threads {torch.get_num_threads()}, prepare {args.prepare}, loader workers {args.num_workers}")
    rows = {}
    for name in args.models:
        rows[name] = run_model(name, graphs, args, device)
    cols = ["load", "prepare", "forward", "backward", "optimizer"]
    print("\nms per step (medians; device synchronised between phases), and per unsynchronised step:")
    print("| model | " + " | ".join(cols) + " | step | x GIN |")
    print("|---" * (len(cols) + 3) + "|")
    gin = rows["gin"][1] if "gin" in rows else None
    for name, (med, step_ms, _) in rows.items():
        ratio = f"{step_ms / gin:.2f}" if gin else "-"
        print(f"| {name} | " + " | ".join(f"{med[c]:.2f}" for c in cols) + f" | {step_ms:.2f} | {ratio} |")
    keys = list(next(iter(rows.values()))[2])
    print(f"\ncounts per step (torch.profiler, {args.profile_steps} steps):")
    print("| model | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, (_, _, counts) in rows.items():
        print(f"| {name} | " + " | ".join(f"{counts[k]:.1f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
