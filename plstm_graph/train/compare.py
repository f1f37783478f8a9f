"""Train several models on the same data, split and seeds; a table of mean +- std and a plot."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from .run import TrainConfig, train_run

__all__ = ["compare_models", "format_table"]


def compare_models(base: TrainConfig, models: Sequence[str], seeds: Sequence[int], out: str) -> Dict:
    """Run ``train_run`` for every (model, seed) with ``base``'s other settings, each in ``out/<model>-seed<k>``.

    Returns ``{"runs": [...], "summary": {model: {metric: [mean, std], "epoch_seconds": mean}}}`` and writes it
    to ``out/compare.json``, the table to ``out/compare.md`` and a bar plot to ``out/compare.png``.
    """
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    runs: List[Dict] = []
    for model in models:
        for seed in seeds:
            cfg = dataclasses.replace(base, model=model, seed=int(seed), out=str(outdir / f"{model}-seed{seed}"))
            res = train_run(cfg)
            if not res:  # non-zero DDP rank
                continue
            runs.append({"model": model, "seed": int(seed), "test": res["test"], "val": res["val"],
                         "epoch_seconds": float(np.median(res["epoch_seconds"])) if res["epoch_seconds"] else float("nan"),
                         "epochs_run": res["epochs_run"], "task": res["task"]})
    summary: Dict[str, Dict] = {}
    for model in models:
        rs = [r for r in runs if r["model"] == model]
        if not rs:
            continue
        s = {k: [float(np.mean([r["test"][k] for r in rs])), float(np.std([r["test"][k] for r in rs]))]
             for k in rs[0]["test"]}
        s["epoch_seconds"] = float(np.mean([r["epoch_seconds"] for r in rs]))
        s["seeds"] = len(rs)
        summary[model] = s
    result = {"runs": runs, "summary": summary, "config": dataclasses.asdict(base), "seeds": list(seeds)}
    (outdir / "compare.json").write_text(json.dumps(result, indent=2))
    table = format_table(summary)
    (outdir / "compare.md").write_text(table + "\n")
    _plot(summary, outdir / "compare.png")
    return result


def format_table(summary: Dict[str, Dict]) -> str:
    """Markdown table: one row per model, test metrics as mean +- std, median seconds per training epoch."""
    if not summary:
        return "(no runs)"
    metrics = [k for k in next(iter(summary.values())) if k not in ("epoch_seconds", "seeds")]
    head = "| model | seeds | " + " | ".join(f"test {m}" for m in metrics) + " | s/epoch |"
    lines = [head, "|" + "---|" * (len(metrics) + 3)]
    for model, s in summary.items():
        cells = " | ".join(f"{s[m][0]:.3f} ± {s[m][1]:.3f}" for m in metrics)
        lines.append(f"| {model} | {s['seeds']} | {cells} | {s['epoch_seconds']:.2f} |")
    return "\n".join(lines)


def _plot(summary: Dict[str, Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [k for k in next(iter(summary.values())) if k not in ("epoch_seconds", "seeds")] if summary else []
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
