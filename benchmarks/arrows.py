"""Arrow-pointing extrapolation: train the pLSTM vision model and a ViT of similar size on the same budget
at a small resolution, evaluate at 1x, 1.5x and 2x the training resolution, print a markdown table.

Paper anchor (trained at 192 px, tested at 384 px, 50 epochs of 100k images): pLSTM 0.778, ViT 0.707
(extrapolation accuracy). Our budgets are far below the paper's.

    python benchmarks/arrows.py --preset cpu          # 2 CPU cores, ~10 minutes
    python benchmarks/arrows.py --preset gpu          # one H200, <= 4 minutes wall including data generation

Choices (see the README, "Arrow-pointing extrapolation"):

* Data: one fixed training set drawn with the vectorised generator (``make_arrow_dataset_fast``) and reused
  across epochs (shuffled per epoch), so generation is seconds, not minutes. Diagnosis: with 4k training
  images even a small CNN memorises (train 0.74, test 0.55 after 500 steps), so the data size, not the
  optimiser, is the first limit; the presets use as many images as the wall budget allows.
* The schedule is linear warm-up (5 %) then cosine to 0, over ``--steps``; ``--time-limit`` (seconds per
  model) is a safety cap: the schedule's progress is ``max(step / steps, elapsed / time_limit)``, so a model
  that is slower than planned still anneals fully and stops in time. The table reports the steps each model
  actually made. If the cap stops the first model (the pLSTM model) early, the later ones train the same
  number of steps, so both see the same images; the cap is only a wall-clock guard.
* Both models use the same width, patch size, MLP ratio, optimiser and data order; the ViT gets ``2 x
  --blocks`` attention blocks (the pLSTM model has ``--blocks`` (P, D) pairs). Position embeddings are
  resized bicubically for the larger test sizes, for both models (as in the paper).
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from plstm_graph.datasets.arrows import make_arrow_dataset_fast
from plstm_graph.models import PLSTMVisionModel, ViT

PRESETS = {
    # 2 shared CPU cores, one thread: a pLSTM step (8x8 grid, batch 32) takes ~1-2 s there.
    # a pLSTM step takes 0.4-1.3 s there (load varies), so the 240 s cap may cut it a few steps short.
    "cpu": dict(resolution=32, patch=4, dim=64, heads=2, vit_heads=4, blocks=1, steps=300, batch=32, lr=2e-3,
                train_samples=20000, eval_samples=512, time_limit=240.0, threads=1, device="cpu"),
    # one H200; 50k images at 32 px generate in ~20-30 s on the host CPU; each model trains <= 75 s, so the
    # whole run (startup, generation, 2 x training, evaluation) stays under 4 minutes.
    "gpu": dict(resolution=32, patch=4, dim=128, heads=4, vit_heads=4, blocks=2, steps=4000, batch=128, lr=1e-3,
                train_samples=50000, eval_samples=2048, time_limit=75.0, threads=8, device="cuda"),
}


def count(model):
    return sum(p.numel() for p in model.parameters())


def train(model, images, labels, args, device, name):
    """AdamW (weight decay 0.05, not on biases/norms/position embeddings), warm-up + cosine, grad clip 1."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.endswith("pos")]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.endswith("pos"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    n = images.shape[0]
    images, labels = images.to(device), labels.to(device)  # the fixed set lives on the device
    model.train()
    t0 = time.time()
    perm, pos, step = torch.randperm(n, generator=gen), 0, 0
    report = max(1, args.steps // 10)
    while step < args.steps:
        progress = max(step / args.steps, (time.time() - t0) / args.time_limit)
        if progress >= 1.0:
            break
        warm = 0.05
        lr = args.lr * (progress / warm if progress < warm else 0.5 * (1 + math.cos(math.pi * (progress - warm) / (1 - warm))))
        for g in opt.param_groups:
            g["lr"] = lr
        if pos + args.batch > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + args.batch].to(device)
        pos += args.batch
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % report == 0:
            print(f"  {name} step {step}/{args.steps} loss {loss.item():.3f} lr {lr:.2e} ({time.time() - t0:.0f} s)",
                  flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.time() - t0, step


@torch.no_grad()
def accuracy(model, images, labels, device, batch=256):
    model.eval()
    correct = 0
    for i in range(0, images.shape[0], batch):
        correct += (model(images[i:i + batch].to(device)).argmax(-1).cpu() == labels[i:i + batch]).sum().item()
    return correct / images.shape[0]


def build(name, args):
    if name == "plstm":
        return PLSTMVisionModel(image_size=args.resolution, patch_size=args.patch, dim=args.dim,
                                num_heads=args.heads, num_blocks=args.blocks, num_classes=2, pool=args.plstm_pool)
    if name == "vit":
        return ViT(image_size=args.resolution, patch_size=args.patch, dim=args.dim, num_heads=args.vit_heads,
                   depth=2 * args.blocks, num_classes=2, pool=args.vit_pool)
    raise SystemExit(f"unknown model {name!r}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="defaults for a budget; any flag below overrides its preset value")
    p.add_argument("--resolution", type=int)
    p.add_argument("--patch", type=int)
    p.add_argument("--dim", type=int)
    p.add_argument("--heads", type=int, help="pLSTM heads (ViT uses --vit-heads)")
    p.add_argument("--vit-heads", type=int)
    p.add_argument("--blocks", type=int, help="pLSTM (P, D) block pairs; the ViT gets 2x blocks")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--train-samples", type=int)
    p.add_argument("--eval-samples", type=int)
    p.add_argument("--time-limit", type=float, help="seconds of training per model (safety cap, see above)")
    p.add_argument("--device")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a shared machine)")
    p.add_argument("--plstm-pool", default="corners", choices=("corners", "mean"))
    p.add_argument("--vit-pool", default="mean", choices=("corners", "mean"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", default="plstm,vit")
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.resolution % (2 * args.patch):
        raise SystemExit("--resolution must be a multiple of 2 * --patch (so that 1.5x is whole patches)")
    res = {"1x": args.resolution, "1.5x": args.resolution * 3 // 2, "2x": args.resolution * 2}
    t0 = time.time()
    train_x, train_y = make_arrow_dataset_fast(args.train_samples, args.resolution, seed=1000 + args.seed)
    evals = {k: make_arrow_dataset_fast(args.eval_samples, r, seed=2000 + args.seed) for k, r in res.items()}
    print(f"generated {args.train_samples} train images at {args.resolution} px and {args.eval_samples} test "
          f"images per size in {time.time() - t0:.0f} s", flush=True)
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(args.seed)
        model = build(name, args).to(device)
        print(f"training {name} ({count(model)} parameters)", flush=True)
        seconds, steps = train(model, train_x, train_y, args, device, name)
        if steps < args.steps:  # the time cap bit: later models get the same number of steps (same data seen)
            print(f"  {name} stopped at the time cap after {steps} steps; later models train {steps} steps")
            args.steps = steps
        accs = {k: accuracy(model, x, y, device) for k, (x, y) in evals.items()}
        print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in accs.items()), flush=True)
        rows.append((name, count(model), steps, seconds, accs))
    print()
    print(f"Arrow pointing (preset {args.preset}), trained at {args.resolution} px, patch {args.patch}, dim {args.dim}, "
          f"batch {args.batch}, lr {args.lr}, {args.train_samples} training images, {args.eval_samples} test "
          f"images per size, device {args.device}; total {time.time() - t0:.0f} s")
    print()
    print("| model | params | steps | train s | " + " | ".join(f"acc {k} ({r} px)" for k, r in res.items()) + " |")
    print("|---|---|---|---|" + "---|" * len(res))
    for name, n, steps, s, accs in rows:
        print(f"| {name} | {n} | {steps} | {s:.0f} | " + " | ".join(f"{accs[k]:.3f}" for k in res) + " |")


if __name__ == "__main__":
    main()
