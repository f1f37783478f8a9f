"""Screen variants of the CURRENT default molecule pLSTM on FreeSolv, many runs side by side (issue #4).

Every (variant, seed) pair is one :func:`~plstm_graph.train.run.train_run` on the CPU with one thread, in a pool
of ``--jobs`` worker processes; a variant is the CLI's defaults (``plstm-graph train --dataset freesolv
--epochs 40 --lr 3e-3``) with the overrides listed in :data:`VARIANTS`. Results stream into ``OUT/runs.jsonl``
as they finish (so a cut-off screen keeps what it finished); at the end a table of mean validation and test
RMSE per variant, with the paired validation and test differences to ``base`` (mean +- standard error over
splits), is printed and written to ``OUT/summary.md``. ``--repeats K`` trains every split K times from other initial weights
(init seeds ``s, s + 1000, ...``, as ``plstm-graph compare --repeats K``); the table then averages the repeats
of each split first. Select on validation only: the test column is for the report.

    OMP_NUM_THREADS=1 python benchmarks/freesolv_screen.py --jobs 14 --seeds 0 1 2 3 4 5 6 7 8 9 --out runs/screen

``base`` reproduces ``plstm-graph compare --dataset freesolv --models plstm --seeds 5 --epochs 40 --lr 3e-3``
seed by seed (same code path, one thread).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

# variant -> (TrainConfig overrides, gate-init overrides for every pLSTM layer, (mode, reverse) pattern or None)
VARIANTS: Dict[str, tuple] = {
    "base": ({}, {}, None),
    "plr0.5": ({"plstm_lr_scale": 0.5}, {}, None),
    "plr0.15": ({"plstm_lr_scale": 0.15}, {}, None),
    "ls0.1": ({"layer_scale": 0.1}, {}, None),
    "ls0.001": ({"layer_scale": 0.001}, {}, None),
    "heads2": ({"num_heads": 2}, {}, None),
    "heads8": ({"num_heads": 8}, {}, None),
    "pD": ({}, {}, [("D", False), ("D", True)] * 2),
    "pP": ({}, {}, [("P", False), ("P", True)] * 2),
    "paper-gates": ({}, {"source_bias": -4.0, "mark_bias": -4.0, "direct_bias": -6.0}, None),
    "open-gates": ({}, {"source_bias": 0.0, "mark_bias": 0.0, "direct_bias": 0.0}, None),
    "hd32": ({}, {"head_dim": 32}, None),
    "mix-on": ({"local_mix": True}, {}, None),
    "no-plstm": ({"layer_scale": 0.0, "plstm_lr_scale": 1e-9}, {}, None),
    # the baselines with the same recipe (``plstm-graph compare --models ...``)
    "gin": ({"model": "gin"}, {}, None),
    "gcn": ({"model": "gcn"}, {}, None),
    "gat": ({"model": "gat"}, {}, None),
    "attentivefp": ({"model": "attentivefp"}, {}, None),
}


def apply_variant(name: str) -> dict:
    """Patch this process for variant ``name`` (gate inits, pattern) and return its ``TrainConfig`` overrides."""
    from plstm_graph.models import molecule
    from plstm_graph.nn import blocks

    overrides, gates, pattern = VARIANTS[name]
    if gates:
        base_init = molecule.plstm_molecule_init
        molecule.plstm_molecule_init = lambda h: {**base_init(h), **gates}
    if pattern is not None:
        blocks.default_pattern = lambda n: list(pattern)
    return dict(overrides)


def _run(job):
    """One training in a fresh worker process (the pool runs one job per process: patches never leak)."""
    name, seed, init, out, cache, epochs = job
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from plstm_graph.train.run import TrainConfig, train_run

    overrides = apply_variant(name)
    cfg = TrainConfig(dataset="freesolv", epochs=epochs, lr=3e-3, progress=False, accelerator="cpu",
                      cache_dir=cache, seed=seed, init_seed=None if init == seed else init,
                      out=str(Path(out) / f"{name}-seed{seed}-init{init}"), **overrides)
    t0 = time.time()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        res = train_run(cfg)
    return {"variant": name, "seed": seed, "init_seed": init, "val": res["val"]["rmse"], "test": res["test"]["rmse"],
            "epochs_run": res["epochs_run"], "seconds": round(time.time() - t0, 1)}


def summarise(rows: List[dict]) -> str:
    """Markdown table of ``rows`` (the JSON lines of ``runs.jsonl``): per variant, the repeats of each split are
    averaged first; val / test means over splits; paired differences to ``base`` over the splits both have."""
    by: Dict[str, Dict[int, dict]] = {}  # variant -> split seed -> mean val / test over its repeats
    for r in rows:
        by.setdefault(r["variant"], {}).setdefault(r["seed"], []).append(r)
    by = {v: {s: {"val": float(np.mean([r["val"] for r in rs])), "test": float(np.mean([r["test"] for r in rs])),
                  "n": len(rs)} for s, rs in d.items()} for v, d in by.items()}
    base = by.get("base", {})
    lines = ["| variant | splits (runs) | val RMSE | test RMSE | test, seeds 0-4 | paired val - base (mean ± s.e.) | paired test - base |",
             "|---|---|---|---|---|---|---|"]
    for name, rs in by.items():
        seeds = sorted(rs)
        val = np.array([rs[s]["val"] for s in seeds])
        test = np.array([rs[s]["test"] for s in seeds])
        t04 = [rs[s]["test"] for s in seeds if s < 5]
        common = [s for s in seeds if s in base]
        paired = []
        for key in ("val", "test"):
            d = np.array([rs[s][key] - base[s][key] for s in common])
            paired.append(f"{d.mean():+.3f} ± {d.std(ddof=1) / np.sqrt(len(d)):.3f}"
                          if len(d) > 1 and name != "base" else "")
        t04s = f"{np.mean(t04):.3f} ({len(t04)})" if t04 else ""
        n = sum(rs[s]["n"] for s in seeds)
        lines.append(f"| {name} | {len(seeds)} ({n}) | {val.mean():.3f} | {test.mean():.3f} | {t04s} | {paired[0]} | {paired[1]} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(5)))
    p.add_argument("--repeats", type=int, default=1,
                   help="trainings per split: init seeds seed, seed + 1000, ... (plstm-graph compare --repeats)")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--epochs", type=int, default=40, help="the CLI's FreeSolv budget; fewer for a smoke test")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = str(out / "cache")
    # featurise once in this process so that the workers only read the cache (a worker runs one job and exits:
    # the patches of a variant never reach another)
    from plstm_graph.train.compare import INIT_SEED_STRIDE
    from plstm_graph.train.run import TrainConfig, train_run

    with contextlib.redirect_stdout(io.StringIO()):
        train_run(TrainConfig(dataset="freesolv", epochs=1, progress=False, accelerator="cpu", cache_dir=cache,
                              out=str(out / "warmup")))
    jobs = [(v, s, s + INIT_SEED_STRIDE * k, str(out), cache, args.epochs)
            for k in range(args.repeats) for s in args.seeds for v in args.variants]  # seed-major: balanced if cut
    rows: List[dict] = []
    with mp.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool, open(out / "runs.jsonl", "a") as f:
        for r in pool.imap_unordered(_run, jobs):
            rows.append(r)
            f.write(json.dumps(r) + "\n")
            f.flush()
            print(json.dumps(r), flush=True)
    table = summarise(rows)
    (out / "summary.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    sys.exit(main())
