"""Molecule benchmarks: accuracy of pLSTM vs PyG baselines, and training throughput vs GIN.

    # accuracy (the README table): FreeSolv scaffold 5 seeds, B3DB classification scaffold 3 seeds
    python benchmarks/molecules.py accuracy --dataset freesolv --seeds 5 --epochs 60 --out runs/bench-freesolv
    python benchmarks/molecules.py accuracy --dataset b3db --seeds 3 --epochs 30 --out runs/bench-b3db

    # throughput: seconds per training epoch on the same molecules, models interleaved (fair under load)
    python benchmarks/molecules.py throughput --dataset freesolv --device cpu
    python benchmarks/molecules.py throughput --dataset b3db --device cuda --batch-size 128
    # collation, pLSTM schedules / Triton plans and packing in 2 loader workers (both models), as the CLI on a GPU
    python benchmarks/molecules.py throughput --dataset freesolv --device cuda --num-workers 2
    # A/B of variants in one run: NAME[key=value,...] (local_mix / layer_scale: the model; other keys: every
    # pLSTM layer, e.g. backend, autocast)
    python benchmarks/molecules.py throughput --dataset freesolv --device cpu --models plstm "plstm[backend=parallel]" gin
    python benchmarks/molecules.py throughput --dataset freesolv --device cuda --models plstm "plstm[autocast=True]" gin

``accuracy`` is ``plstm-graph compare`` with the given budget; it prints the markdown table and writes
``OUT/compare.{json,md,png}``. ``throughput`` prints a table of median seconds per epoch and the ratio to GIN;
both models are built with the training CLI's dropout (0.1; ``--dropout``, 0 before 2026-11-29's third session).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OUTDATED_IGNORE", "1")


def accuracy(args) -> None:
    from plstm_graph.train.compare import compare_models, format_table
    from plstm_graph.train.run import TrainConfig

    base = TrainConfig(dataset=args.dataset, split=args.split, epochs=args.epochs, batch_size=args.batch_size,
                       hidden=args.hidden, num_layers=args.layers, num_heads=args.heads, lr=args.lr,
                       patience=args.patience, max_molecules=args.max_molecules, progress=False,
                       accelerator="cpu" if args.device == "cpu" else "auto", out=args.out)
    t0 = time.time()
    res = compare_models(base, args.models, list(range(args.seeds)), args.out)
    print(format_table(res["summary"]))
    print(f"\n{args.dataset}, {args.split} split, seeds 0..{args.seeds - 1}, {args.epochs} epochs max, "
          f"hidden {args.hidden}, {args.layers} layers; {time.time() - t0:.0f} s total; written to {args.out}")


def _build(spec: str, args):
    """A model from a name with optional settings, ``NAME[key=value,...]`` (A/B of variants in one run):
    ``local_mix`` and ``layer_scale`` go to :class:`MoleculeModel`, every other key to each pLSTM layer
    (``plstm_kwargs``: ``backend``, ``autocast``, ``fused_gates``, gate inits). E.g. ``plstm[backend=parallel]``,
    ``plstm[autocast=True]``, ``plstm[local_mix=gin]``."""
    import ast

    from plstm_graph.models.molecule import MoleculeModel

    name, _, rest = spec.partition("[")
    model_kw, layer_kw = {}, {}
    for item in filter(None, rest.rstrip("]").split(",")):
        key, _, text = item.partition("=")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        (model_kw if key in ("local_mix", "layer_scale") else layer_kw)[key.strip()] = value
    if layer_kw:
        model_kw["plstm_kwargs"] = layer_kw
    return MoleculeModel(name, hidden=args.hidden, num_layers=args.layers, num_heads=args.heads,
                         dropout=args.dropout, **model_kw)


def throughput(args) -> None:
    import torch
    from torch_geometric.loader import DataLoader

    from plstm_graph.datasets.molecules import build_graphs, load_dataset
    from plstm_graph.graph import PrepareCollate, prepare_batch

    device = torch.device(args.device)
    graphs = build_graphs(load_dataset(args.dataset), progress=False, warn=False).graphs
    if args.max_molecules:
        graphs = graphs[: args.max_molecules]
    models = {name: _build(name, args).to(device) for name in args.models}
    # AdamW as torch picks its implementation (the training CLI's setting); --fused-adamw: fused, every model
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-3, **({"fused": True} if args.fused_adamw else {}))
            for n, m in models.items()}
    amp = device.type == "cuda" and args.precision == "bf16"
    times = {n: [] for n in models}
    breakdown = {}
    loaders = {}
    if args.num_workers:  # one persistent loader per model; its workers prepare and pack every batch
        for name, model in models.items():
            collate = PrepareCollate(graphs, keys=model if name.startswith("plstm") else (), device=device)
            loaders[name] = torch.utils.data.DataLoader(
                graphs, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers, collate_fn=collate,
                pin_memory=device.type == "cuda", persistent_workers=True)
    for rep in range(args.repeats + 1):  # the first round warms up (allocator, lazy init, workers) and is dropped
        for name, model in models.items():
            loader = loaders.get(name) or DataLoader(graphs, batch_size=args.batch_size, shuffle=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            parts = [0.0, 0.0, 0.0, 0.0]  # --breakdown: first wait, other waits, prepare, step (host time)
            it, first = iter(loader), True
            while True:
                t0 = time.perf_counter()
                b = next(it, None)
                if b is None:
                    break
                t1 = time.perf_counter()
                # pLSTM: schedules and Triton plans built on the CPU batch and moved with it (no host syncs)
                # (from the workers: a packed batch, copied and unpacked by prepare_batch, for either model)
                b = (prepare_batch(b, device, keys=model) if name.startswith("plstm") or args.num_workers
                     else b.to(device, non_blocking=True))
                t2 = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    out = model(b)
                y = b.y.float()
                mask = ~torch.isnan(y)  # torch.where, not y[mask]: boolean indexing syncs with the host
                loss = torch.where(mask, (out.float() - torch.where(mask, y, 0.0)) ** 2, 0.0).sum() / mask.sum().clamp(min=1)
                opts[name].zero_grad()
                loss.backward()
                opts[name].step()
                parts[0 if first else 1] += t1 - t0
                parts[2] += t2 - t1
                parts[3] += time.perf_counter() - t2
                first = False
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep:
                times[name].append(time.perf_counter() - t)
                breakdown.setdefault(name, []).append(parts)
    gin = statistics.median(times["gin"]) if "gin" in times else None
    print(f"{args.dataset}: {len(graphs)} molecules/epoch, batch {args.batch_size}, hidden {args.hidden}, "
          f"dropout {args.dropout}, {args.layers} layers, device {device}{' (bf16 autocast)' if amp else ''}, "
          f"threads {torch.get_num_threads()}, loader workers {args.num_workers}")
    print("| model | params | s/epoch (median) | x GIN |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        params = sum(p.numel() for p in models[name].parameters())
        print(f"| {name} | {params:,} | {med:.2f} | {med / gin:.2f} |" if gin else f"| {name} | {params:,} | {med:.2f} | - |")
    if args.breakdown:
        print("\nms per epoch (medians): loader wait for the first batch, for the others, prepare_batch (copy and "
              "unpack), the step's host time (forward, backward, AdamW; not synchronised)")
        print("| model | first wait | other waits | prepare | step (host) |")
        print("|---|---|---|---|---|")
        for name, rows in breakdown.items():
            med = [1e3 * statistics.median(r[i] for r in rows) for i in range(4)]
            print(f"| {name} | " + " | ".join(f"{m:.1f}" for m in med) + " |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    for name in ("accuracy", "throughput"):
        q = sub.add_parser(name)
        q.add_argument("--dataset", default="freesolv")
        q.add_argument("--models", nargs="+",
                       default=["plstm", "gin", "gcn", "gat", "attentivefp"] if name == "accuracy" else ["plstm", "gin"])
        q.add_argument("--hidden", type=int, default=64)
        q.add_argument("--layers", type=int, default=4)
        q.add_argument("--heads", type=int, default=4)
        q.add_argument("--batch-size", type=int, default=32)
        q.add_argument("--max-molecules", type=int, default=None)
        q.add_argument("--device", default="cpu")
    a = sub.choices["accuracy"]
    a.add_argument("--split", default="scaffold")
    a.add_argument("--seeds", type=int, default=5)
    a.add_argument("--epochs", type=int, default=60)
    a.add_argument("--patience", type=int, default=15)
    a.add_argument("--lr", type=float, default=3e-3)
    a.add_argument("--out", default="runs/bench-molecules")
    t = sub.choices["throughput"]
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--dropout", type=float, default=0.1,
                   help="dropout of both models (default 0.1, the training CLI's; before 2026-11-29: 0)")
    t.add_argument("--fused-adamw", action="store_true",
                   help="AdamW(fused=True) for every model (one kernel for all parameters; CUDA or CPU)")
    t.add_argument("--breakdown", action="store_true",
                   help="also print where each epoch's time goes: loader waits, prepare_batch, the step's host time")
    t.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="CUDA only: bf16 autocast (default, as the training CLI) or float32 for every model")
    t.add_argument("--num-workers", type=int, default=0,
                   help="loader workers (persistent) that collate, build the pLSTM schedules and Triton plans and "
                        "pack each batch (plstm_graph.graph.PrepareCollate), for every model; 0: all in the main "
                        "process")
    args = p.parse_args(argv)
    accuracy(args) if args.what == "accuracy" else throughput(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
