"""Arrow-pointing extrapolation: train the pLSTM vision model and a ViT of similar size on the same budget
at a small resolution, evaluate at 1x, 1.5x and 2x the training resolution, print a markdown table.

Paper anchor (trained at 192 px, tested at 384 px, 50 epochs of 100k images): pLSTM 0.778, ViT 0.707
(extrapolation accuracy). This script's defaults are a CPU-minutes budget, far below the paper's.

    python benchmarks/arrows.py                       # CPU, 32 px, a few minutes
    python benchmarks/arrows.py --device cuda --resolution 64 --steps 3000 --train-samples 50000
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from plstm_graph.datasets.arrows import make_arrow_dataset
from plstm_graph.models import PLSTMVisionModel, ViT


def count(model):
    return sum(p.numel() for p in model.parameters())


def train(model, images, labels, args, device, name):
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    t0 = time.time()
    for step in range(args.steps):
        idx = torch.randint(0, images.shape[0], (args.batch,), generator=gen)
        x, y = images[idx].to(device), labels[idx].to(device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, args.steps // 10) == 0:
            print(f"  {name} step {step + 1}/{args.steps} loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    return time.time() - t0


@torch.no_grad()
def accuracy(model, images, labels, device, batch=128):
    model.eval()
    correct = 0
    for i in range(0, images.shape[0], batch):
        correct += (model(images[i:i + batch].to(device)).argmax(-1).cpu() == labels[i:i + batch]).sum().item()
    return correct / images.shape[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=2, help="pLSTM heads (ViT uses --vit-heads)")
    p.add_argument("--vit-heads", type=int, default=4)
    p.add_argument("--blocks", type=int, default=1, help="pLSTM (P, D) block pairs; the ViT gets 2x blocks")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-samples", type=int, default=4000)
    p.add_argument("--eval-samples", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is fastest on a shared machine: small ops and busy cores)")
    p.add_argument("--models", default="plstm,vit")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.resolution % (2 * args.patch):
        raise SystemExit("--resolution must be a multiple of 2 * --patch (so that 1.5x is whole patches)")
    res = {"1x": args.resolution, "1.5x": args.resolution * 3 // 2, "2x": args.resolution * 2}
    print(f"generating data: {args.train_samples} train at {args.resolution} px, {args.eval_samples} eval per size")
    train_x, train_y = make_arrow_dataset(args.train_samples, args.resolution, seed=1000 + args.seed, progress=True)
    evals = {k: make_arrow_dataset(args.eval_samples, r, seed=2000 + args.seed, progress=True) for k, r in res.items()}
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(args.seed)
        if name == "plstm":
            model = PLSTMVisionModel(image_size=args.resolution, patch_size=args.patch, dim=args.dim,
                                     num_heads=args.heads, num_blocks=args.blocks, num_classes=2, pool="corners")
        elif name == "vit":
            model = ViT(image_size=args.resolution, patch_size=args.patch, dim=args.dim, num_heads=args.vit_heads,
                        depth=2 * args.blocks, num_classes=2, pool="mean")
        else:
            raise SystemExit(f"unknown model {name!r}")
        model.to(device)
        print(f"training {name} ({count(model)} parameters)")
        seconds = train(model, train_x, train_y, args, device, name)
        accs = {k: accuracy(model, x, y, device) for k, (x, y) in evals.items()}
        rows.append((name, count(model), seconds, accs))
    print()
    print(f"Arrow pointing, trained at {args.resolution} px for {args.steps} steps x batch {args.batch} "
          f"({args.train_samples} images), {args.eval_samples} test images per size, device {args.device}")
    print()
    print("| model | params | train s | " + " | ".join(f"acc {k} ({r} px)" for k, r in res.items()) + " |")
    print("|---|---|---|" + "---|" * len(res))
    for name, n, s, accs in rows:
        print(f"| {name} | {n} | {s:.0f} | " + " | ".join(f"{accs[k]:.3f}" for k in res) + " |")


if __name__ == "__main__":
    main()
