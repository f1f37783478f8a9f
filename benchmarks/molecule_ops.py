"""Where the host time of a molecule training step goes, below the phases of ``molecule_step.py``.

    python benchmarks/molecule_ops.py counts --device cuda     # kernel-launching aten ops per step, by model part
    python benchmarks/molecule_ops.py profile --device cuda    # cProfile of 20 pLSTM training steps (+ GIN ms/step)
    OMP_NUM_THREADS=1 python benchmarks/molecule_ops.py optime --device cpu   # plstm_dag fwd+bwd per call, by backend
    python benchmarks/molecule_ops.py paths --dataset b3db   # line-graph paths per batch (the paths backend's tables)

* ``counts``: one training step of the default molecule pLSTM (bf16 autocast on CUDA, AdamW), every non-view
  ``aten::`` op counted once (roughly one kernel launch each on CUDA) and attributed to the part of the model
  whose forward created it: ``gates`` (``PLSTMGraphLayer._gates``), ``operator`` (``plstm_dag``), ``project``,
  ``mhnorm`` (per-head RMSNorm), ``local`` (``LocalBondMix``), ``other``; backward ops by the autograd node
  that runs them (``?Name`` when the node was not created under a tagged part: autocast casts, Functions).
* ``profile``: cProfile of 20 prepared pLSTM steps, sorted by own and by cumulative time; ``--fused-adamw``.
* ``optime``: ``plstm_dag`` forward + backward on the P schedules of FreeSolv batches of 32 with random
  inputs (H = 4, K = V = 16, the default model's), ms per call, for each backend given.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

os.environ.setdefault("OUTDATED_IGNORE", "1")

_VIEW = {"view", "_unsafe_view", "t", "transpose", "expand", "unsqueeze", "squeeze", "select", "slice", "as_strided",
         "alias", "detach", "split", "unbind", "split_with_sizes", "empty", "empty_strided", "permute",
         "_reshape_alias", "lift_fresh", "_local_scalar_dense", "is_same_size", "promote_types"}


def _batches(model, device, n=None, batch_size=32):
    import torch
    from torch_geometric.loader import DataLoader

    from plstm_graph.datasets.molecules import build_graphs, load_dataset
    from plstm_graph.graph import prepare_batch

    graphs = build_graphs(load_dataset("freesolv"), progress=False, warn=False).graphs
    loader = DataLoader(graphs, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    out = [prepare_batch(b, device, keys=model) if model is not None else b.to(device) for b in loader]
    return out[:n] if n else out


def counts(args) -> None:
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from plstm_graph.models.molecule import MoleculeModel
    from plstm_graph.nn import blocks, graph, norm

    dev = torch.device(args.device)
    state, nodes = {"tag": "other"}, {}

    class Creator(TorchFunctionMode):  # remembers which part created every autograd node
        def __torch_function__(self, func, types, a=(), kw=None):
            out = func(*a, **(kw or {}))
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor) and o.grad_fn is not None and o.grad_fn not in nodes:
                    nodes[o.grad_fn] = state["tag"]
            return out

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.c = collections.Counter()

        def __torch_dispatch__(self, func, types, a=(), kw=None):
            name = func.__name__.split(".")[0]
            if name not in _VIEW:
                node = torch._C._current_autograd_node()
                tag = state["tag"] if node is None else nodes.get(node, "?" + node.name())
                self.c[(tag, name)] += 1
            return func(*a, **(kw or {}))

    def tagged(owner, attr, tag):
        orig = getattr(owner, attr)

        def wrapper(*a, **kw):
            old, state["tag"] = state["tag"], tag
            try:
                return orig(*a, **kw)
            finally:
                state["tag"] = old
        setattr(owner, attr, wrapper)

    tagged(graph.PLSTMGraphLayer, "_gates", "gates")
    tagged(graph.PLSTMGraphLayer, "project", "project")
    tagged(norm.MultiHeadRMSNorm, "forward", "mhnorm")
    tagged(blocks.LocalBondMix, "forward", "local")
    tagged(graph, "plstm_dag", "operator")  # what PLSTMGraphLayer's _operator() returns outside torch.compile
    torch.manual_seed(0)
    model = MoleculeModel("plstm", hidden=64, num_layers=4, dropout=0.1).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = _batches(model, dev, n=1)[0]
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    for _ in range(3):  # compile, allocate
        with torch.autocast(**amp):
            out = model(batch)
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    mode = Counter()
    with Creator(), mode:
        with torch.autocast(**amp):
            out = model(batch)
        loss = out.float().pow(2).mean()
    fwd, mode.c = mode.c, collections.Counter()
    with mode:
        loss.backward()
    bwd, mode.c = mode.c, collections.Counter()
    with mode:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    for phase, c in (("forward", fwd), ("backward", bwd), ("optimizer", mode.c)):
        parts = collections.Counter()
        for (tag, _), k in c.items():
            parts[tag if not tag.startswith("?") else "?"] += k
        print(f"{phase}: {sum(parts.values())} ops", dict(parts.most_common()))
    for phase, c in (("forward", fwd), ("backward", bwd)):
        for tag in sorted({t for t, _ in c}):
            print(f"  {phase} {tag}:", sorted(((n, k) for (t, n), k in c.items() if t == tag), key=lambda x: -x[1]))


def profile(args) -> None:
    import cProfile
    import io
    import pstats

    import torch

    from plstm_graph.models.molecule import MoleculeModel

    dev = torch.device(args.device)
    for name in ("plstm", "gin"):
        torch.manual_seed(0)
        model = MoleculeModel(name, hidden=64, num_layers=4).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **({"fused": True} if args.fused_adamw else {}))
        bs = _batches(model if name == "plstm" else None, dev, n=20)

        def step(b):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                out = model(b)
            loss = (out.float() - b.y.float()).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

        for b in bs * 2:  # compile every variant these batches need
            step(b)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        prof = cProfile.Profile() if name == "plstm" else None
        if prof:
            prof.enable()
        for b in bs:
            step(b)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if prof:
            prof.disable()
        print(f"{name}: {1e3 * (time.perf_counter() - t) / len(bs):.2f} ms/step (fused AdamW {args.fused_adamw})")
        if prof:
            for key in ("tottime", "cumulative"):
                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats(key).print_stats(30)
                print(s.getvalue())


def optime(args) -> None:
    import torch

    from plstm_graph.models.molecule import MoleculeModel
    from plstm_graph.ops import plstm_dag

    dev = torch.device(args.device)
    bs = _batches(MoleculeModel("plstm", hidden=64, num_layers=4), dev)
    h, k = 4, 16
    for backend in args.backends:
        for rep in range(2):  # the first pass builds the schedules' cached layouts
            total = 0.0
            for b in bs:
                s = b.schedule("P", False)
                g = torch.Generator(device=dev).manual_seed(0)

                def rnd(*shape):
                    return torch.rand(*shape, generator=g, device=dev).requires_grad_()
                q, kk, v = rnd(s.num_nodes, h, k), rnd(s.num_nodes, h, k), rnd(s.num_nodes, h, k)
                t = time.perf_counter()
                y = plstm_dag(q, kk, v, rnd(s.num_edges, h), rnd(s.num_line_edges, h) * 0.5, rnd(s.num_edges, h),
                              rnd(s.num_nodes, h), s, backend=backend)
                y.pow(2).sum().backward()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                total += time.perf_counter() - t
            if rep:
                print(f"{backend}: {1e3 * total / len(bs):.2f} ms per call, forward + backward ({len(bs)} batches of 32)")


def paths(args) -> None:
    """Line-graph paths per batch of 32 (what the ``paths`` backend enumerates), per schedule the model uses."""
    import statistics

    import torch
    from torch_geometric.loader import DataLoader

    from plstm_graph.datasets.molecules import build_graphs, load_dataset
    from plstm_graph.graph import prepare_batch
    from plstm_graph.models.molecule import MoleculeModel
    from plstm_graph.ops.dag.paths import count_paths, path_tables

    graphs = build_graphs(load_dataset(args.dataset), progress=False, warn=False).graphs
    model = MoleculeModel("plstm", hidden=64, num_layers=4)
    loader = DataLoader(graphs, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    rows = []
    for b in loader:
        prepare_batch(b, "cpu", keys=model)
        for key in (("P", False), ("P", True), ("D", False), ("D", True)):
            s = b.schedule(*key)
            width = path_tables(s)["factors"].shape[1]  # longest path's edges + 1 (its mark)
            rows.append((s.num_edges, s.num_line_edges, count_paths(s), width - 1))
    mean = [statistics.mean(r[i] for r in rows) for i in range(3)]
    print(f"{args.dataset}, {len(rows)} schedules of batches of 32: edges {mean[0]:.0f}, line edges {mean[1]:.0f}, "
          f"paths {mean[2]:.0f} (max {max(r[2] for r in rows)}), longest path {max(r[3] for r in rows)} edges")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["counts", "profile", "optime", "paths"])
    p.add_argument("--dataset", default="freesolv", help="paths: the dataset")
    p.add_argument("--device", default="cuda")
    p.add_argument("--fused-adamw", action="store_true", help="profile: AdamW(fused=True)")
    p.add_argument("--backends", nargs="+", default=["paths", "parallel", "levels"], help="optime: plstm_dag backends")
    args = p.parse_args(argv)
    {"counts": counts, "profile": profile, "optime": optime, "paths": paths}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
