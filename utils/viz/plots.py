"""The figures of a run (SPEC 8), drawn from the files the run wrote, and the ``redraw`` /
``compare`` command line (``python -m utils.plots``).

Training code does not plot: the command lines call :func:`draw_figures` after a run has
finished.  ``plot_run`` reads ``per_class.csv``, ``confMat.npy``, ``classifier_weight.npy``,
``trackRecords.ckpt``, ``calibration.json`` and ``metrics.csv`` from a run directory (plus the training images,
for the montage) and writes PNGs to ``<run>/imgs/``; the figures themselves are
utils/viz/figures.py's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from utils.config.load import from_dict, read_json_file
from utils.data.datasets import load_dataset
from utils.errors import ConfigError, UserError
from utils.viz.figures import (accuracy_curves_figure, bar_by_class_figure, class_loss_figure, compare_runs_figure,
                           confusion_matrix_figure, feature_norm_figure, feature_weight_figure, forgetting_figure,
                           group_confusion_figure, montage_figure, per_class_accuracy_figure, plot_tau_sweep,
                           reliability_figure, save_figure, stage_comparison_figure, weight_cosine_figure, weight_norm_evolution_figure)
from utils.names import (ARGS_FILE, CALIBRATION_FILE, CLASSIFIER_WEIGHT_FILE, CONFMAT_FILE, FIGURE_EVENTS_SUFFIX, IMG_DIR,
                         PER_CLASS_FILE, TAU_SWEEP_CSV, TAU_SWEEP_JSON, TRACK_RECORDS_FILE)
from utils.engine.records import forgetting_scores, head_to_tail

# Shown in TensorBoard at the end of a run.
MAIN_FIGURES = ("confusion_matrix", "per_class_accuracy", "weight_norm", "feature_norm", "accuracy_curves",
                "weight_norm_evolution")


# ---------------------------------------------------------------------------
# Everything for one run directory
# ---------------------------------------------------------------------------

def plot_run(run: Path, train_images: Optional[torch.Tensor] = None, train_labels: Optional[torch.Tensor] = None,
             stage1_run: Optional[Path] = None, writer=None) -> list[Path]:
    """Draw every figure the run's files allow into <run>/imgs/; returns the PNG paths.

    Without trackRecords.ckpt (stage 2 with 0 epochs) the per-epoch figures
    are skipped; without images the montage is skipped.
    """
    run = Path(run)
    out = run / IMG_DIR
    df_all = pd.read_csv(run / PER_CLASS_FILE)
    acc_col = "test_acc" if "test_acc" in df_all else "val_acc"
    eval_split = acc_col.split("_")[0]
    counts = df_all["n_train"].tolist()
    order = head_to_tail(counts)
    names = df_all["name"].astype(str).tolist()
    groups = df_all["group"].tolist()
    df = df_all.iloc[order].reset_index(drop=True)
    figures: dict[str, Figure] = {}
    conf = np.load(run / CONFMAT_FILE)
    figures["confusion_matrix"] = confusion_matrix_figure(conf, order, names)
    figures["confusion_groups"] = group_confusion_figure(conf, groups)
    figures["per_class_accuracy"] = per_class_accuracy_figure(df, acc_col)
    figures["weight_norm"] = bar_by_class_figure(df, "weight_norm", "classifier weight norm ||w_c||",
                                                 "Per-class classifier weight norm")
    weight_file = run / CLASSIFIER_WEIGHT_FILE
    if weight_file.is_file():
        figures["weight_cosine"] = weight_cosine_figure(np.load(weight_file), order, names)
    calibration_file = run / CALIBRATION_FILE
    if calibration_file.is_file():
        calib = read_json_file(calibration_file, CALIBRATION_FILE)
        figures["reliability"] = reliability_figure(calib["bins"], float(calib["ECE"]))
    figures["feature_norm"] = feature_norm_figure(df, eval_split)
    figures["feature_weight"] = feature_weight_figure(df, eval_split)
    track_file = run / TRACK_RECORDS_FILE
    if track_file.is_file():
        track = torch.load(track_file, map_location="cpu", weights_only=True)
        epochs = int(track["acc_val"].numel())
        if epochs:
            figures["accuracy_curves"] = accuracy_curves_figure(track["acc_train"].numpy(), track["acc_val"].numpy(),
                                                                int(track.get("best_epoch", 0)))
            figures["weight_norm_evolution"] = weight_norm_evolution_figure(track["weight_norm"].numpy(), order, names)
            if "class_loss" in track:
                figures["train_loss_per_class"] = class_loss_figure(track["class_loss"].numpy(), order, names, groups)
            if "labels" in track:
                scores = forgetting_scores(track["correct"]).numpy()
                figures["forgetting"] = forgetting_figure(scores, track["labels"].numpy(), order, names, groups, epochs)
    if train_images is not None and train_labels is not None and train_images.dim() == 4:  # images, not a table
        figures["montage"] = montage_figure(train_images, train_labels, order, names)
    if stage1_run is not None and (Path(stage1_run) / PER_CLASS_FILE).is_file():
        df1 = pd.read_csv(Path(stage1_run) / PER_CLASS_FILE)
        if acc_col in df1 and len(df1) == len(df):
            figures["per_class_accuracy_vs_stage1"] = stage_comparison_figure(df, df1, acc_col)
            figures["weight_norm_vs_stage1"] = compare_runs_figure(
                [df1, df], ["stage 1", "this run (stage 2)"], "weight_norm",
                "Per-class classifier weight norm: stage 1 vs stage 2")
    paths = []
    for name, fig in figures.items():
        paths.append(save_figure(fig, out / f"{name}.png"))
        if writer is not None and name in MAIN_FIGURES + ("per_class_accuracy_vs_stage1",):
            writer.add_figure(f"figures/{name}", fig, close=False)
    return paths


# ---------------------------------------------------------------------------
# Command line: redraw a run's figures, or compare runs
# ---------------------------------------------------------------------------

def _run_config(run: Path):
    """The run's validated config (args.json), or None when it cannot be read."""
    try:
        return from_dict(read_json_file(run / ARGS_FILE, ARGS_FILE), str(run / ARGS_FILE))
    except (OSError, ValueError, ConfigError):
        return None


def _load_train_images(cfg):
    """The run's training images for the montage, or (None, None) if the data is not at hand."""
    if cfg is None:
        return None, None
    try:
        data = load_dataset(cfg.data.name, cfg.data.root, cfg.data.imb_type, cfg.data.imb_factor,
                            cfg.data.n_classes, download=False)
    except (OSError, ValueError, UserError):
        return None, None
    return data.train_images, data.train_labels


def _stage1_run(cfg) -> Optional[Path]:
    """The stage-1 run a stage-2 run started from (its figures are drawn beside it)."""
    if cfg is None or cfg.project_name != "second" or not cfg.model.is_pretrained:
        return None
    return Path(cfg.model.pretrained_path) / str(cfg.seeds)


def draw_figures(run: Path, tensorboard: bool = True) -> list[Path]:
    """Every figure of a finished run, from its files: the PNGs in <run>/imgs/ and, with
    ``tensorboard``, the main ones as TensorBoard images.

    The command lines call this after a run has finished (training code never imports
    plotting), and ``python -m utils.plots redraw`` calls it again: the TensorBoard images
    live in their own events file, which a redraw replaces whole."""
    import json
    run = Path(run)
    cfg = _run_config(run)
    images, labels = _load_train_images(cfg)
    writer = None
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        for old in run.glob(f"events.out.tfevents.*{FIGURE_EVENTS_SUFFIX}"):
            old.unlink()
        writer = SummaryWriter(log_dir=str(run), filename_suffix=FIGURE_EVENTS_SUFFIX)
    try:
        paths = plot_run(run, images, labels, _stage1_run(cfg), writer)
        sweep_csv, sweep_json = run / TAU_SWEEP_CSV, run / TAU_SWEEP_JSON
        if sweep_csv.is_file() and sweep_json.is_file():
            rows = pd.read_csv(sweep_csv).to_dict("records")
            best = json.loads(sweep_json.read_text(encoding="utf-8"))["best_tau"]
            paths.append(plot_tau_sweep(rows, best, run / IMG_DIR / "tau_sweep.png"))
    finally:
        if writer is not None:
            writer.close()
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    import sys
    parser = argparse.ArgumentParser(
        prog="python -m utils.plots",
        description="redraw: the figures of run directories into <run>/imgs/. "
                    "compare: one per-class column (per_class.csv) of several runs side by side, head to tail.")
    sub = parser.add_subparsers(dest="command", required=True)
    redraw = sub.add_parser("redraw", help="redraw the figures of run directories")
    redraw.add_argument("runs", nargs="+")
    compare = sub.add_parser("compare", help="compare runs class by class")
    compare.add_argument("runs", nargs="+", help="run directories (with per_class.csv)")
    compare.add_argument("--labels", nargs="+", help="legend labels (default: the run paths)")
    compare.add_argument("--column", default="test_acc",
                         help="per_class.csv column: test_acc, weight_norm, test_feature_norm, ... (default test_acc)")
    compare.add_argument("--title", default=None)
    compare.add_argument("--out", required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    if args.command == "redraw":
        for run in map(Path, args.runs):
            if not (run / PER_CLASS_FILE).is_file():
                print(f"error: {run / PER_CLASS_FILE} not found; give a finished run directory", file=sys.stderr)
                return 2
            for path in draw_figures(run):
                print(path)
        return 0
    labels = args.labels or [str(r) for r in args.runs]
    if len(labels) != len(args.runs):
        print(f"error: --labels gives {len(labels)} labels for {len(args.runs)} runs", file=sys.stderr)
        return 2
    frames = []
    for run in map(Path, args.runs):
        if not (run / PER_CLASS_FILE).is_file():
            print(f"error: {run / PER_CLASS_FILE} not found; give finished run directories", file=sys.stderr)
            return 2
        frames.append(pd.read_csv(run / PER_CLASS_FILE))
    if args.column not in frames[0]:
        print(f"error: --column {args.column!r} is not in per_class.csv; choose one of: "
              + ", ".join(c for c in frames[0].columns if c not in ("class", "name", "group")), file=sys.stderr)
        return 2
    if any(len(f) != len(frames[0]) or args.column not in f for f in frames):
        print("error: the runs do not have the same classes or the column", file=sys.stderr)
        return 2
    print(save_figure(compare_runs_figure(frames, labels, args.column, args.title), Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
