"""Long-range DAG task: a 2-layer pLSTM stack vs PyG GIN / GCN / GAT stacks (2, 4, 8 layers).

Every model gets the same data, the same optimiser, learning rate, batch size and number of epochs, and
a hidden width chosen so that its parameter count is close to the pLSTM model's. Labels sit on sinks
whose key is 30..60 hops upstream (``plstm_graph.datasets.longrange``), so a k-layer message-passing
network sees only distractors and stays at chance, while one pLSTM layer reaches every ancestor.

CPU (about 15 minutes on 2 busy cores; ``--models plstm,gin8`` for a quick look):
    python benchmarks/longrange.py --threads 1
GPU (the lead's machine):
    python benchmarks/longrange.py --device cuda --train 2000 --test 500 --epochs 40

Prints a markdown table: model, layers, parameters, train / test accuracy on sink labels, seconds.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch_geometric.loader import DataLoader
from torch_geometric.nn import GATConv, GCNConv, GINConv

from plstm_graph.datasets.longrange import NUM_CLASSES, NUM_FEATURES, longrange_dataset
from plstm_graph.models import PLSTMGraphModel


class MPNN(nn.Module):
    """Encoder, ``num_layers`` residual message-passing layers along the edge directions, node head."""

    def __init__(self, kind: str, in_dim: int, hidden: int, out_dim: int, num_layers: int, heads: int = 4):
        super().__init__()
        self.enc = nn.Linear(in_dim, hidden)
        convs = []
        for _ in range(num_layers):
            if kind == "gin":
                convs.append(GINConv(nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden)),
                                     train_eps=True))
            elif kind == "gcn":
                convs.append(GCNConv(hidden, hidden))
            elif kind == "gat":
                convs.append(GATConv(hidden, hidden // heads, heads=heads))
            else:
                raise ValueError(kind)
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(num_layers))
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, batch):
        h = self.enc(batch.x)
        for conv, norm in zip(self.convs, self.norms):
            h = h + torch.relu(conv(norm(h), batch.edge_index))
        return self.head(h)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matched_mpnn(kind: str, layers: int, target: int, heads: int = 4) -> MPNN:
    """The MPNN whose hidden width (a multiple of ``heads``) brings its parameter count closest to ``target``."""
    best = None
    for hidden in range(heads, 513, heads):
        p = num_params(MPNN(kind, NUM_FEATURES, hidden, NUM_CLASSES, layers, heads))
        if best is None or abs(p - target) < best[0]:
            best = (abs(p - target), hidden)
    return MPNN(kind, NUM_FEATURES, best[1], NUM_CLASSES, layers, heads)


@torch.no_grad()
def accuracy(model, loader, device) -> float:
    model.eval()
    correct = total = 0
    for batch in loader:
        batch = batch.to(device)
        pred = model(batch).argmax(-1)
        m = batch.label_mask
        correct += int((pred[m] == batch.y[m]).sum())
        total += int(m.sum())
    return correct / max(total, 1)


def train(model, train_loader, test_loader, epochs: int, lr: float, device, desc: str):
    from tqdm import tqdm

    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    t0 = time.time()
    for _ in tqdm(range(epochs), desc=desc, leave=False):
        model.train()
        for batch in train_loader:
            batch = batch.to(device)
            out = model(batch)
            loss = nn.functional.cross_entropy(out[batch.label_mask], batch.y[batch.label_mask])
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    seconds = time.time() - t0
    return accuracy(model, train_loader, device), accuracy(model, test_loader, device), seconds


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=300, help="training graphs")
    ap.add_argument("--test", type=int, default=100, help="test graphs")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--dim", type=int, default=32, help="pLSTM width")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--min-depth", type=int, default=30)
    ap.add_argument("--max-depth", type=int, default=60)
    ap.add_argument("--models", default="plstm,gin2,gin4,gin8,gcn2,gcn4,gcn8,gat2,gat4,gat8")
    ap.add_argument("--backend", default="levels", help="plstm_dag backend of the pLSTM model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    t0 = time.time()
    kw = dict(min_depth=args.min_depth, max_depth=args.max_depth, modes=("P", "D"), reverse=False)
    train_set = longrange_dataset(args.train, seed=args.seed, **kw)
    test_set = longrange_dataset(args.test, seed=args.seed + 10_000, **kw)
    labels = sum(int(g.label_mask.sum()) for g in test_set)
    print(f"data: {args.train} train / {args.test} test graphs, {labels} test sinks, "
          f"mean {sum(g.num_nodes for g in train_set) / len(train_set):.0f} nodes, "
          f"sink-key distance {args.min_depth}-{args.max_depth} hops ({time.time() - t0:.0f} s to generate)")
    gen = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=gen)
    test_loader = DataLoader(test_set, batch_size=64)

    def plstm():
        return PLSTMGraphModel(NUM_FEATURES, args.dim, NUM_CLASSES, num_heads=args.heads, task="node",
                               pattern=[("P", False), ("D", False)], backend=args.backend)

    torch.manual_seed(args.seed)
    target = num_params(plstm())
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(args.seed)
        if name == "plstm":
            model, kind, layers = plstm(), "pLSTM (P + D)", 2
        else:
            kind, layers = name[:3], int(name[3:])
            model = matched_mpnn(kind, layers, target, heads=args.heads)
            kind = kind.upper()
        tr, te, sec = train(model, train_loader, test_loader, args.epochs, args.lr, device, name)
        rows.append((kind, layers, num_params(model), tr, te, sec))
        print(f"  {kind:14s} {layers} layers  {num_params(model):7d} params  train {tr:.3f}  test {te:.3f}  {sec:.0f} s",
              flush=True)
    print()
    print(f"| model | layers | params | train acc | test acc | train time (s) |")
    print(f"|---|---|---|---|---|---|")
    for kind, layers, p, tr, te, sec in rows:
        print(f"| {kind} | {layers} | {p:,} | {tr:.3f} | {te:.3f} | {sec:.0f} |")
    print(f"\nchance = 0.5; same budget for all: {args.epochs} epochs, batch {args.batch_size}, AdamW lr {args.lr} "
          f"(constant), grad clip 1.0, seed {args.seed}")


if __name__ == "__main__":
    main()
