"""Train a small character-level RetNetLM on Python's own standard library source, then decode.

Data: the ``*.py`` files at the top of ``sysconfig.get_paths()["stdlib"]`` (shipped with every Python),
read as UTF-8 bytes (vocabulary 256), sorted by name; the last 5% of the bytes are held out.

Prints the training loss falling (tqdm bar), held-out loss before/after, a generated sample, and the
memory of recurrent decoding at growing lengths: the per-layer state is ``[B, H, K, V]`` whatever the
length, so the state bytes and the process memory stay flat.

    python benchmarks/train_retnet_lm.py --steps 150 --threads 1   # ~2-3 min on a small CPU
    python benchmarks/train_retnet_lm.py --device cuda --steps 2000 --dim 256 --layers 4
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import resource
import sysconfig
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from plstm_graph.models import RetNetLM


def load_stdlib_bytes(max_bytes: int) -> bytes:
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    chunks, total = [], 0
    for path in files:
        with open(path, "rb") as fh:
            data = fh.read()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise SystemExit("error: no *.py files found in the standard library directory")
    return b"\n".join(chunks)[:max_bytes]


def batches(data: torch.Tensor, batch: int, length: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, data.numel() - length - 1, (batch,), generator=generator)
        idx = starts[:, None] + torch.arange(length + 1)
        yield data[idx]


@torch.no_grad()
def held_out_loss(model, data: torch.Tensor, length: int, device, max_windows: int = 16) -> float:
    n = min(max_windows, (data.numel() - 1) // length)
    ids = data[: n * length + 1]
    x = ids[:-1].view(n, length).to(device)
    y = ids[1:].view(n, length).to(device)
    return F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()).item()


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@torch.no_grad()
def decoding_memory(model, lengths, device, batch: int = 1):
    """Decode ``max(lengths)`` tokens one step at a time (feeding back samples); report at each length."""
    model.eval()
    gen = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    token = torch.full((batch,), ord("d"), dtype=torch.long, device=device)
    state, rows, t0 = None, [], time.perf_counter()
    targets = sorted(lengths)
    for step in tqdm(range(1, targets[-1] + 1), desc="decoding", leave=False):
        logits, state = model.step(token, state)
        probs = logits.float().softmax(-1).cpu()
        token = torch.multinomial(probs, 1, generator=gen)[:, 0].to(device)
        if step in targets:
            peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
            rows.append((step, state.nbytes(), rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                         peak, step / (time.perf_counter() - t0)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--max-bytes", type=int, default=2_000_000)
    p.add_argument("--sample-len", type=int, default=300)
    p.add_argument("--memory-lengths", type=str, default="1000,4000,16000")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    raw = load_stdlib_bytes(args.max_bytes)
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    split = int(0.95 * data.numel())
    train, val = data[:split], data[split:]
    print(f"data: {len(raw):,} bytes of Python stdlib source from {sysconfig.get_paths()['stdlib']}")

    model = RetNetLM(vocab_size=256, dim=args.dim, num_layers=args.layers, num_heads=args.heads,
                     chunk_size=args.chunk_size).to(device)
    print(f"model: RetNetLM dim={args.dim} layers={args.layers} heads={args.heads} "
          f"params={sum(p.numel() for p in model.parameters()):,} device={device}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    print(f"held-out loss before training: {held_out_loss(model, val, args.seq_len, device):.3f} nats/byte "
          f"(uniform: {math.log(256):.3f})")
    stream = batches(train, args.batch, args.seq_len, torch.Generator().manual_seed(args.seed))
    model.train()
    t0, smooth = time.perf_counter(), None
    bar = tqdm(range(args.steps), desc="training")
    for step in bar:
        ids = next(stream).to(device)
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        sched.step()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        bar.set_postfix(loss=f"{smooth:.3f}")
        if (step + 1) % max(1, args.steps // 10) == 0:
            tqdm.write(f"step {step + 1:5d}  loss {smooth:.3f}")
    model.eval()
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.0f} s")
    print(f"held-out loss after training:  {held_out_loss(model, val, args.seq_len, device):.3f} nats/byte")

    prompt = torch.tensor([list(b"def ")], device=device)
    out = model.generate(prompt, max_new_tokens=args.sample_len, temperature=0.8, top_k=20,
                         generator=torch.Generator(device=device).manual_seed(1))
    print("---- sample (prompt 'def ') ----")
    print(bytes(out[0].tolist()).decode("utf-8", errors="replace"))
    print("--------------------------------")

    lengths = [int(x) for x in args.memory_lengths.split(",") if x]
    rows = decoding_memory(model, lengths, device)
    print("recurrent decoding memory (batch 1, one step per token):")
    print(f"{'tokens':>8} {'state bytes':>12} {'RSS MiB':>9} {'peak RSS MiB':>13} {'CUDA peak MiB':>14} {'tok/s':>8}")
    for tokens, nbytes, rss, peak_rss, cuda_peak, tps in rows:
        print(f"{tokens:>8} {nbytes:>12,} {rss:>9.1f} {peak_rss:>13.1f} {cuda_peak:>14.1f} {tps:>8.0f}")


if __name__ == "__main__":
    main()
