"""Train several models on the same data, split and seeds; a table of mean +- std and a plot."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from .run import TrainConfig, train_run

__all__ = ["compare_models", "format_table"]

_NOT_METRICS = ("epoch_seconds", "seeds", "repeats")


INIT_SEED_STRIDE = 1000  # repeat k of split seed s starts from init seed s + 1000 k


def compare_models(base: TrainConfig, models: Sequence[str], seeds: Sequence[int], out: str,
                   repeats: int = 1) -> Dict:
    """Run ``train_run`` for every (model, seed) with ``base``'s other settings, each in ``out/<model>-seed<s>``.

    ``repeats=K`` trains every (model, split seed ``s``) K times from other initial weights: init seeds ``s``
    (the run of ``repeats=1``), ``s + 1000``, ``s + 2000``, ... in ``out/<model>-seed<s>-init<i>`` for the extra
    ones. Every model sees the same splits and init seeds. On small data sets (FreeSolv's 64 test molecules) the
    initial weights move one run's test error by as much as the choice of model; the mean of K runs per split
    estimates what a model does on that split, so that the comparison is about models, not draws.

    Returns ``{"runs": [...], "summary": {model: {metric: [mean, std], "epoch_seconds": mean, "seeds": n,
    "repeats": K}}}``: a metric's mean is over splits of the per-split mean over repeats, its std the standard
    deviation of those per-split means over splits (with ``repeats=1``: mean and std over seeds, as before).
    Writes it to ``out/compare.json``, the table to ``out/compare.md`` and a bar plot to ``out/compare.png``.
    """
    if int(repeats) < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    runs: List[Dict] = []
    for model in models:
        for seed in seeds:
            for k in range(int(repeats)):
                init = int(seed) + INIT_SEED_STRIDE * k
                name = f"{model}-seed{seed}" + (f"-init{init}" if k else "")
                cfg = dataclasses.replace(base, model=model, seed=int(seed), init_seed=None if k == 0 else init,
                                          out=str(outdir / name))
                res = train_run(cfg)
                if not res:  # non-zero DDP rank
                    continue
                runs.append({"model": model, "seed": int(seed), "init_seed": init, "test": res["test"],
                             "val": res["val"],
                             "epoch_seconds": (float(np.median(res["epoch_seconds"])) if res["epoch_seconds"]
                                               else float("nan")),
                             "epochs_run": res["epochs_run"], "task": res["task"]})
    summary: Dict[str, Dict] = {}
    for model in models:
        rs = [r for r in runs if r["model"] == model]
        if not rs:
            continue
        splits = sorted({r["seed"] for r in rs})
        s = {}
        for k in rs[0]["test"]:
            per_split = [np.mean([r["test"][k] for r in rs if r["seed"] == sd]) for sd in splits]
            s[k] = [float(np.mean(per_split)), float(np.std(per_split))]
        s["epoch_seconds"] = float(np.mean([r["epoch_seconds"] for r in rs]))
        s["seeds"] = len(splits)
        s["repeats"] = int(repeats)
        summary[model] = s
    result = {"runs": runs, "summary": summary, "config": dataclasses.asdict(base), "seeds": list(seeds),
              "repeats": int(repeats)}
    (outdir / "compare.json").write_text(json.dumps(result, indent=2))
    table = format_table(summary)
    (outdir / "compare.md").write_text(table + "\n")
    _plot(summary, outdir / "compare.png")
    return result


def format_table(summary: Dict[str, Dict]) -> str:
    """Markdown table: one row per model, test metrics as mean +- std, median seconds per training epoch; the
    seeds column reads ``splits × repeats`` when there are repeats."""
    if not summary:
        return "(no runs)"
    metrics = [k for k in next(iter(summary.values())) if k not in _NOT_METRICS]
    head = "| model | seeds | " + " | ".join(f"test {m}" for m in metrics) + " | s/epoch |"
    lines = [head, "|" + "---|" * (len(metrics) + 3)]
    for model, s in summary.items():
        cells = " | ".join(f"{s[m][0]:.3f} ± {s[m][1]:.3f}" for m in metrics)
        seeds = f"{s['seeds']} × {s['repeats']}" if s.get("repeats", 1) > 1 else f"{s['seeds']}"
        lines.append(f"| {model} | {seeds} | {cells} | {s['epoch_seconds']:.2f} |")
    return "\n".join(lines)


def _plot(summary: Dict[str, Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [k for k in next(iter(summary.values())) if k not in _NOT_METRICS] if summary else []
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(3.2 * (len(metrics) + 1), 3.2))
    axes = np.atleast_1d(axes)
    names = list(summary)
    for ax, m in zip(axes, metrics):
        ax.bar(names, [summary[n][m][0] for n in names], yerr=[summary[n][m][1] for n in names], capsize=3,
               color=["tab:red" if n == "plstm" else "tab:gray" for n in names])
        ax.set_title(f"test {m}")
        ax.tick_params(axis="x", rotation=45)
    if len(axes):
        ax = axes[-1]
        ax.bar(names, [summary[n]["epoch_seconds"] for n in names], color="tab:blue")
        ax.set_title("seconds / epoch")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
