"""``plstm-graph train | predict | compare``: molecule property prediction from the command line.

Registered by ``plstm_graph.cli.build_parser`` through :func:`add_parser`. Importing this module is cheap
(no Lightning, no RDKit); they are imported when a command runs. Every user mistake ends in one line
``plstm-graph: error: ...`` and exit code 2: argument errors too (each parser's ``error`` is replaced).
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from typing import List, Optional

__all__ = ["add_parser"]

_MODELS = ("plstm", "gin", "gcn", "gat", "attentivefp")
_DATASETS = ("freesolv", "b3db", "b3db-logbb", "qm9")
_SPLITS = ("random", "scaffold", "kfold", "scaffold-kfold")


def _user_error():
    from plstm_graph import cli

    main = sys.modules.get("__main__")  # under `python -m plstm_graph.cli` the catching class lives there
    if main is not None and getattr(main, "__file__", None) == cli.__file__:
        return main.UserError
    return cli.UserError


def _one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    def error(message: str):  # argparse would print the usage block too; we print one line
        print(f"plstm-graph {parser.prog.split()[-1]}: error: {message}", file=sys.stderr)
        raise SystemExit(2)

    parser.error = error  # type: ignore[method-assign]
    return parser


def _int_at_least(minimum: int):
    """An argparse ``type`` for whole numbers >= ``minimum`` (one-line errors through :func:`_one_line_errors`)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _local_mix(text: str):
    """``--local-mix``: on / off (the GELU local term or none), gine (GIN's layer as the second residual) or gin
    (GIN's layer without a residual, the pLSTM branch adding to its input)."""
    value = text.strip().lower()
    if value in ("gine", "gin", "mix"):
        return value if value != "mix" else True
    try:
        return _on_off(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected gine, gin, on or off, got {text!r}") from None


def _local_mix_name(value) -> str:
    return value if isinstance(value, str) else ("on" if value else "off")


def _on_off(text: str) -> bool:
    value = text.strip().lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (a shipped data set, or your CSV)")
    g.add_argument("--dataset", choices=_DATASETS, default=None, help="shipped data set (default: freesolv)")
    g.add_argument("--csv", metavar="PATH", help="your CSV file (one molecule per row)")
    g.add_argument("--smiles-column", metavar="COL", help="CSV column holding SMILES")
    g.add_argument("--target-column", metavar="COL", action="append", default=[],
                   help="CSV target column; repeat for several targets (blank cells = missing labels)")
    g.add_argument("--task", choices=("regression", "classification"), default=None,
                   help="default: the data set's task; for a CSV, classification if every label is 0/1")
    g.add_argument("--split", choices=_SPLITS, default="scaffold", help="default: scaffold (Bemis-Murcko)")
    g.add_argument("--folds", type=_positive_int, default=5, help="k for the k-fold splits (default 5)")
    g.add_argument("--fold", type=_nonneg_int, default=0, help="which fold is the test set (default 0)")
    g.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="featurised data cache (default ~/.cache/plstm-graph or $PLSTM_GRAPH_CACHE)")
    g.add_argument("--max-molecules", type=_positive_int, default=None, help="use only the first N valid molecules")


def _add_train_args(p: argparse.ArgumentParser, epochs_default: int = 40) -> None:
    from .run import TrainConfig as _DEFAULTS  # numpy and torch only; the recipe defaults live there

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=_positive_int, default=epochs_default, help=f"default {epochs_default}")
    g.add_argument("--batch-size", type=_positive_int, default=32, help="default 32")
    g.add_argument("--lr", type=_positive_float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    g.add_argument("--hidden", type=_positive_int, default=64, help="width (default 64)")
    g.add_argument("--layers", type=_positive_int, default=4, help="backbone layers (default 4)")
    g.add_argument("--heads", type=_positive_int, default=4, help="pLSTM / GAT heads (default 4)")
    g.add_argument("--dropout", type=_fraction, default=0.1, help="default 0.1")
    g.add_argument("--local-mix", type=_local_mix, default=_DEFAULTS.local_mix, metavar="gine|gin|on|off",
                   help="pLSTM only: every block's local part next to its pLSTM layer: gine = GIN's layer (bonded "
                        "neighbours and bond types, BatchNorm MLP) as the block's second residual; gin = GIN's "
                        "layer without a residual, the pLSTM branch adding to its input; on = a GELU sum "
                        "over the bonded neighbours read by a per-node MLP; off = the per-node MLP alone (default "
                        f"{_local_mix_name(_DEFAULTS.local_mix)})")
    g.add_argument("--layer-scale", type=_nonneg_float, default=_DEFAULTS.layer_scale,
                   help="pLSTM only: initial value of the learned per-channel scale on every pLSTM layer's output "
                        f"(LayerScale; 0 = no scale; default {_DEFAULTS.layer_scale})")
    g.add_argument("--plstm-lr-scale", type=_positive_float, default=_DEFAULTS.plstm_lr_scale,
                   help="pLSTM only: the pLSTM layers and their LayerScale train with learning rate --lr times this "
                        f"(1 = one learning rate for everything; default {_DEFAULTS.plstm_lr_scale})")
    g.add_argument("--patience", type=_nonneg_int, default=15, help="early-stopping patience in epochs (default 15)")
    g.add_argument("--warmup-epochs", type=_nonneg_int, default=_DEFAULTS.warmup_epochs,
                   help=f"linear learning-rate warm-up before the cosine decay (default {_DEFAULTS.warmup_epochs})")
    g.add_argument("--ema-decay", type=_fraction, default=_DEFAULTS.ema_decay,
                   help="moving average of the weights used for validation, checkpoints and prediction "
                        f"(0 = off; default {_DEFAULTS.ema_decay})")
    g.add_argument("--select", choices=("best", "last"), default=_DEFAULTS.select,
                   help="evaluate the epoch with the best validation metric (with early stopping, --patience) or "
                        f"the weights after the last epoch (default {_DEFAULTS.select})")
    g.add_argument("--grad-clip", type=_nonneg_float, default=_DEFAULTS.grad_clip,
                   help=f"gradient-norm clipping (0 = off; default {_DEFAULTS.grad_clip})")
    g.add_argument("--devices", type=_positive_int, default=1, help="GPUs (or CPU processes); >1 uses DDP")
    g.add_argument("--accelerator", default="auto", choices=("auto", "cpu", "gpu", "cuda"))
    g.add_argument("--precision", default=None, help="Lightning precision (default: bf16-mixed on GPU, 32 on CPU)")
    g.add_argument("--num-workers", type=_nonneg_int, default=None,
                   help="data loader workers; they also build the pLSTM schedules and Triton plans and pack each "
                        "batch for one copy to the device (default: 4 when training on a GPU, 0 on CPU)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config(args, model: str, seed: int, out: str):
    from .run import TrainConfig

    dataset = args.dataset if (args.dataset or args.csv) else "freesolv"
    if args.csv and args.dataset:
        raise _user_error()("give either --dataset or --csv, not both")
    if not args.csv and (args.smiles_column or args.target_column):
        raise _user_error()("--smiles-column / --target-column need --csv")
    return TrainConfig(
        dataset=None if args.csv else dataset, csv=args.csv, smiles_column=args.smiles_column,
        target_columns=list(args.target_column), task=args.task, model=model, split=args.split, folds=args.folds,
        fold=args.fold, seed=seed, init_seed=getattr(args, "init_seed", None),  # train only; compare sets its own
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, hidden=args.hidden, num_layers=args.layers, num_heads=args.heads,
        dropout=args.dropout, local_mix=args.local_mix, layer_scale=args.layer_scale,
        plstm_lr_scale=args.plstm_lr_scale, patience=args.patience,
        warmup_epochs=args.warmup_epochs, ema_decay=args.ema_decay, grad_clip=args.grad_clip, select=args.select,
        devices=args.devices, accelerator=args.accelerator, precision=args.precision, num_workers=args.num_workers,
        out=out, cache_dir=args.cache_dir,
        max_molecules=args.max_molecules, progress=not args.no_progress,
    )


def _check_model(name: str) -> str:
    if name not in _MODELS:
        raise _user_error()(f"unknown model {name!r}; choose one of: {', '.join(_MODELS)}")
    return name


def _imports():
    try:
        import lightning  # noqa: F401
        import rdkit  # noqa: F401
    except ImportError as err:
        raise _user_error()(f"{err.name} is not installed; install with: pip install 'plstm-graph[chem,train]'") from None


def _run_guarded(fn, *a, **kw):
    """Turn data / configuration mistakes raised before training starts into one-line errors."""
    from .run import UserInputError

    try:
        return fn(*a, **kw)
    except UserInputError as err:
        raise _user_error()(str(err)) from None


def _fmt(metrics: dict) -> str:
    return "  ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def _cmd_train(args) -> int:
    _imports()
    from .run import train_run

    cfg = _config(args, _check_model(args.model), args.seed,
                  args.out or f"runs/{(args.dataset or ('csv' if args.csv else 'freesolv'))}-{args.model}")
    result = _run_guarded(train_run, cfg)
    if not result:  # non-zero DDP rank
        return 0
    print(f"{result['dataset']} ({result['task']}, {cfg.split} split, seed {cfg.seed}"
          f"{'' if cfg.init_seed is None else f', init seed {cfg.init_seed}'}, model {cfg.model}): "
          f"{result['num_molecules']['train']}/{result['num_molecules']['val']}/{result['num_molecules']['test']} "
          f"train/val/test molecules, {result['epochs_run']} epochs")
    print(f"val   {_fmt(result['val'])}")
    print(f"test  {_fmt(result['test'])}")
    print(f"saved {cfg.out}/metrics.json and {cfg.out}/model.pt")
    return 0


def _read_smiles_csv(path: str, column: str) -> List[str]:
    import pandas as pd

    UserError = _user_error()
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise UserError(f"CSV file not found: {path}") from None
    except pd.errors.EmptyDataError:
        raise UserError(f"CSV file {path} is empty") from None
    except pd.errors.ParserError as err:
        raise UserError(f"cannot parse CSV file {path}: {str(err).splitlines()[0]}") from None
    if column not in df.columns:
        raise UserError(f"column {column!r} not in {path}; columns are: {', '.join(map(str, df.columns))}")
    if len(df) == 0:
        raise UserError(f"CSV file {path} has a header but no rows")
    return df[column].tolist()


def _cmd_predict(args) -> int:
    _imports()
    from .run import load_trained

    UserError = _user_error()
    if (args.smiles is None) == (args.csv is None):
        raise UserError("give either --smiles S [S ...] or --csv PATH --smiles-column COL")
    if args.csv is not None:
        if not args.smiles_column:
            raise UserError("--csv needs --smiles-column")
        smiles = _read_smiles_csv(args.csv, args.smiles_column)
        where = "line {}".format
        offset = 2
    else:
        smiles = list(args.smiles)
        where = "input {}".format
        offset = 1
    try:
        model = load_trained(args.model_dir)
    except FileNotFoundError as err:
        raise UserError(str(err)) from None
    pred, invalid = model.predict(smiles)
    for i, reason in invalid:
        print(f"plstm-graph predict: warning: {where(i + offset)}: invalid SMILES {smiles[i]!r} ({reason}); "
              "prediction left empty", file=sys.stderr)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["smiles", *model.targets])
    for s, row in zip(smiles, pred):
        w.writerow([s, *("" if math.isnan(v) else repr(float(v)) for v in row)])
    if args.out:
        try:
            with open(args.out, "w") as f:
                f.write(buf.getvalue())
        except OSError as err:
            raise UserError(f"cannot write {args.out}: {err.strerror}") from None
    else:
        sys.stdout.write(buf.getvalue())
    return 0


def _cmd_compare(args) -> int:
    _imports()
    from .compare import compare_models, format_table

    models = [_check_model(m) for m in args.models]
    if not models:
        raise _user_error()("--models needs at least one model")
    base = _config(args, models[0], 0, args.out)
    result = _run_guarded(compare_models, base, models, list(range(args.seed, args.seed + args.seeds)), args.out,
                          repeats=args.repeats)
    if result and result.get("summary"):
        print(format_table(result["summary"]))
        print(f"saved {args.out}/compare.json, compare.md and compare.png")
    return 0


def add_parser(sub) -> None:
    """Register ``train``, ``predict`` and ``compare`` on the CLI's subparsers."""
    p = _one_line_errors(sub.add_parser(
        "train", help="train a molecule property model (no arguments: pLSTM on FreeSolv, scaffold split)",
        description="Train on a shipped data set or your CSV; prints test metrics and writes OUT/metrics.json "
                    "and OUT/model.pt."))
    _add_data_args(p)
    p.add_argument("--model", default="plstm", help=f"one of {', '.join(_MODELS)} (default plstm)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the split and the model (default 0)")
    p.add_argument("--init-seed", type=_nonneg_int, default=None, metavar="N",
                   help="seed of the model's initial weights, batch order and dropout only (default: --seed); "
                        "the split stays --seed's")
    _add_train_args(p)
    p.add_argument("--out", metavar="DIR", default=None, help="run directory (default runs/<dataset>-<model>)")
    p.set_defaults(func=_cmd_train)

    p = _one_line_errors(sub.add_parser(
        "predict", help="predict with a trained model",
        description="Writes a CSV: header smiles,<targets>, one row per input in input order; an invalid "
                    "SMILES gets empty cells and a warning on stderr."))
    p.add_argument("--model-dir", required=True, metavar="DIR", help="directory written by 'plstm-graph train'")
    p.add_argument("--smiles", nargs="+", metavar="S", help="SMILES strings")
    p.add_argument("--csv", metavar="PATH", help="CSV with a SMILES column")
    p.add_argument("--smiles-column", metavar="COL")
    p.add_argument("--out", metavar="FILE", help="output CSV (default: standard output)")
    p.set_defaults(func=_cmd_predict)

    p = _one_line_errors(sub.add_parser(
        "compare", help="train pLSTM and PyG baselines on the same split and seeds; table + plot",
        description="Runs 'train' for every model and seed; prints mean +- std of the test metrics and "
                    "seconds per epoch; writes OUT/compare.json, compare.md, compare.png."))
    _add_data_args(p)
    p.add_argument("--models", nargs="+", default=list(_MODELS), help=f"default: {' '.join(_MODELS)}")
    p.add_argument("--seeds", type=_positive_int, default=3, help="number of seeds (default 3)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="first seed (default 0)")
    p.add_argument("--repeats", type=_positive_int, default=1, metavar="K",
                   help="trainings per split, each from other initial weights (init seeds seed, seed + 1000, "
                        "seed + 2000, ...); the table reports the mean over splits of the per-split means "
                        "(default 1)")
    _add_train_args(p, epochs_default=40)
    p.add_argument("--out", metavar="DIR", default="runs/compare", help="default runs/compare")
    p.set_defaults(func=_cmd_compare)
