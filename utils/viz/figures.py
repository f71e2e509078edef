"""The figures of a run (SPEC 8), each a function of plain arrays and tables that returns a
Matplotlib Figure (built without pyplot: no global state, an Agg canvas, so it draws on
machines without a display and inside tests).  Every per-class axis runs from the head class
(most training images) to the tail.  utils/viz/plots.py reads a run's files and calls these.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from utils.names import GROUPS
from utils.engine.records import class_mean, head_to_tail
from utils.run.rundir import atomic_write_bytes

GROUP_COLOURS = {"Many": "#1f77b4", "Medium": "#ff7f0e", "Few": "#2ca02c"}


def _figure(width: float = 7.0, height: float = 4.5) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    import io
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _class_ticks(ax, labels: Sequence[str], axis: str = "x") -> None:
    """Tick labels of a head-to-tail class axis; thinned for many classes."""
    k = len(labels)
    step = max(1, int(np.ceil(k / 25)))
    pos = list(range(0, k, step))
    if axis == "x":
        ax.set_xticks(pos)
        ax.set_xticklabels([labels[i] for i in pos], rotation=90 if k > 10 else 0, fontsize=8)
    else:
        ax.set_yticks(pos)
        ax.set_yticklabels([labels[i] for i in pos], fontsize=8)


def _heatmap_ticks(ax, labels: Sequence[str]) -> None:
    """Class names on both axes of a seaborn heatmap (cells centred at i + 0.5); thinned for many classes."""
    k = len(labels)
    step = max(1, int(np.ceil(k / 25)))
    pos = list(range(0, k, step))
    ax.set_xticks([i + 0.5 for i in pos])
    ax.set_xticklabels([labels[i] for i in pos], rotation=90 if k > 10 else 0, fontsize=8)
    ax.set_yticks([i + 0.5 for i in pos])
    ax.set_yticklabels([labels[i] for i in pos], rotation=0, fontsize=8)


def _group_spans(ax, groups: Sequence[str]) -> None:
    """Light background bands marking the Many / Medium / Few classes."""
    for g in GROUPS:
        idx = [i for i, gg in enumerate(groups) if gg == g]
        if idx:
            ax.axvspan(min(idx) - 0.5, max(idx) + 0.5, color=GROUP_COLOURS[g], alpha=0.08, lw=0)


# ---------------------------------------------------------------------------
# Single figures (each returns the Figure; plot_run saves them)
# ---------------------------------------------------------------------------

def confusion_matrix_figure(conf: np.ndarray, order: list[int], names: list[str]) -> Figure:
    import seaborn as sns
    k = len(order)
    fig = _figure(7.5, 6.5) if k <= 30 else _figure(10, 9)
    ax = fig.add_subplot()
    sub = conf[np.ix_(order, order)]
    sns.heatmap(sub, ax=ax, cmap="viridis", vmin=0, vmax=1, square=True, annot=k <= 12, fmt=".2f",
                annot_kws={"fontsize": 7}, cbar_kws={"label": "fraction of the true class"})
    ax.set_xlabel("predicted class (head → tail)")
    ax.set_ylabel("true class (head → tail)")
    ax.set_title("Row-normalised confusion matrix")
    _heatmap_ticks(ax, [names[c] for c in order])
    return fig


def group_confusion(conf: np.ndarray, groups: list[str]) -> np.ndarray:
    """3 x 3: for the classes of each true group (rows Many/Medium/Few), the
    mean over those classes of the fraction predicted as a class of each group."""
    out = np.zeros((3, 3))
    for i, gt in enumerate(GROUPS):
        rows = [c for c, g in enumerate(groups) if g == gt]
        if not rows:
            continue
        for j, gp in enumerate(GROUPS):
            cols = [c for c, g in enumerate(groups) if g == gp]
            out[i, j] = conf[np.ix_(rows, cols)].sum(axis=1).mean() if cols else 0.0
    return out


def group_confusion_figure(conf: np.ndarray, groups: list[str]) -> Figure:
    import seaborn as sns
    fig = _figure(5.5, 4.5)
    ax = fig.add_subplot()
    sns.heatmap(group_confusion(conf, groups), ax=ax, annot=True, fmt=".3f", cmap="viridis", vmin=0, vmax=1,
                xticklabels=GROUPS, yticklabels=GROUPS, cbar_kws={"label": "class-averaged fraction"})
    ax.set_xlabel("predicted group")
    ax.set_ylabel("true group")
    ax.set_title("Many / Medium / Few confusion")
    return fig


def per_class_accuracy_figure(df: pd.DataFrame, acc_col: str) -> Figure:
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    x = np.arange(len(df))
    ax.bar(x, df[acc_col], color=[GROUP_COLOURS[g] for g in df["group"]])
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("class (head → tail)")
    ax.set_ylabel(f"{acc_col.split('_')[0]} accuracy")
    _class_ticks(ax, list(df["name"].astype(str)))
    ax2 = ax.twinx()
    ax2.plot(x, df["n_train"], color="black", marker=".", lw=1)
    ax2.set_ylabel("training images (line)")
    ax2.set_ylim(0, None)
    from matplotlib.patches import Patch
    handles = [Patch(color=GROUP_COLOURS[g], label=g) for g in GROUPS if g in set(df["group"])]
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    ax.set_title(f"Per-class {acc_col.split('_')[0]} accuracy (All {df[acc_col].mean():.3f}) and class size")
    return fig


def bar_by_class_figure(df: pd.DataFrame, column: str, ylabel: str, title: str) -> Figure:
    fig = _figure()
    ax = fig.add_subplot()
    _group_spans(ax, list(df["group"]))
    ax.bar(np.arange(len(df)), df[column], color=[GROUP_COLOURS[g] for g in df["group"]])
    ax.set_xlabel("class (head → tail)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _class_ticks(ax, list(df["name"].astype(str)))
    return fig


def weight_cosine_figure(weight: np.ndarray, order: list[int], names: list[str]) -> Figure:
    import seaborn as sns
    w = torch.as_tensor(weight, dtype=torch.float64)[order]
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = (w @ w.T).numpy()
    fig = _figure(7, 6)
    ax = fig.add_subplot()
    k = len(order)
    sns.heatmap(cos, ax=ax, cmap="coolwarm", vmin=-1, vmax=1, square=True, annot=k <= 10, fmt=".2f",
                annot_kws={"fontsize": 7}, cbar_kws={"label": "cosine similarity"})
    ax.set_xlabel("class (head → tail)")
    ax.set_ylabel("class (head → tail)")
    ax.set_title("Cosine similarity between classifier weights")
    _heatmap_ticks(ax, [names[c] for c in order])
    return fig


def feature_norm_figure(df: pd.DataFrame, eval_split: str) -> Figure:
    fig = _figure()
    ax = fig.add_subplot()
    x = np.arange(len(df))
    _group_spans(ax, list(df["group"]))
    ax.plot(x, df["train_feature_norm"], marker="o", label="train")
    ax.plot(x, df[f"{eval_split}_feature_norm"], marker="s", label=eval_split)
    ax.set_xlabel("class (head → tail)")
    ax.set_ylabel("mean penultimate-feature norm ||h||")
    ax.set_title("Per-class mean feature norm")
    ax.legend()
    _class_ticks(ax, list(df["name"].astype(str)))
    return fig


def feature_weight_figure(df: pd.DataFrame, eval_split: str) -> Figure:
    fig = _figure(11, 4.5)
    x = np.arange(len(df))
    ax = fig.add_subplot(1, 2, 1)
    _group_spans(ax, list(df["group"]))
    ax.plot(x, df["train_feature_weight_cos"], marker="o", label="train")
    ax.plot(x, df[f"{eval_split}_feature_weight_cos"], marker="s", label=eval_split)
    ax.set_xlabel("class (head → tail)")
    ax.set_ylabel("mean cos(h, w_y)")
    ax.set_title("Feature vs own-class weight: cosine")
    ax.legend()
    _class_ticks(ax, list(df["name"].astype(str)))
    ax = fig.add_subplot(1, 2, 2)
    _group_spans(ax, list(df["group"]))
    ax.plot(x, df["train_feature_norm"], marker="o", label="||h|| train")
    ax.plot(x, df[f"{eval_split}_feature_norm"], marker="s", label=f"||h|| {eval_split}")
    ax.set_xlabel("class (head → tail)")
    ax.set_ylabel("mean feature norm ||h||")
    ax2 = ax.twinx()
    ax2.plot(x, df["weight_norm"], color="black", marker="^", label="||w_y||")
    ax2.set_ylabel("classifier weight norm ||w_y|| (black)")
    ax.set_title("Feature vs own-class weight: norms")
    ax.legend(loc="upper right", fontsize=8)
    _class_ticks(ax, list(df["name"].astype(str)))
    return fig


def _epoch_lines(ax, values: np.ndarray, order: list[int], names: list[str]) -> None:
    """One line per class (E x K values), coloured from head (dark) to tail (light)."""
    import matplotlib
    cmap = matplotlib.colormaps["viridis"]
    from matplotlib.ticker import MaxNLocator
    epochs = np.arange(1, values.shape[0] + 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    k = len(order)
    for rank, c in enumerate(order):
        ax.plot(epochs, values[:, c], color=cmap(rank / max(1, k - 1)), lw=1,
                label=names[c] if k <= 10 else None)
    if k <= 10:
        ax.legend(fontsize=7, ncol=2, title="class (head → tail)", title_fontsize=7)
    else:
        sm = matplotlib.cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.Normalize(0, k - 1))
        ax.figure.colorbar(sm, ax=ax, label="class rank (0 = head)")


def class_loss_figure(class_loss: np.ndarray, order: list[int], names: list[str], groups: list[str]) -> Figure:
    fig = _figure(11, 4.5)
    ax = fig.add_subplot(1, 2, 1)
    last = class_loss[-1][order]
    ax.bar(np.arange(len(order)), last, color=[GROUP_COLOURS[groups[c]] for c in order])
    ax.set_xlabel("class (head → tail)")
    ax.set_ylabel("mean cross-entropy")
    ax.set_title(f"Per-class training loss, last epoch ({class_loss.shape[0]})")
    _class_ticks(ax, [names[c] for c in order])
    ax = fig.add_subplot(1, 2, 2)
    _epoch_lines(ax, class_loss, order, names)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean cross-entropy")
    ax.set_yscale("log")
    ax.set_title("Per-class training loss over epochs")
    return fig


def accuracy_curves_figure(acc_train: np.ndarray, acc_val: np.ndarray, best_epoch: int) -> Figure:
    fig = _figure()
    ax = fig.add_subplot()
    from matplotlib.ticker import MaxNLocator
    epochs = np.arange(1, len(acc_train) + 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.plot(epochs, acc_train, marker=".", label="train (class-averaged, augmented batches)")
    ax.plot(epochs, acc_val, marker=".", label="validation (class-averaged)")
    if best_epoch:
        ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"best epoch {best_epoch}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("Accuracy per epoch")
    ax.legend(fontsize=8)
    return fig


def weight_norm_evolution_figure(norms: np.ndarray, order: list[int], names: list[str]) -> Figure:
    fig = _figure()
    ax = fig.add_subplot()
    _epoch_lines(ax, norms, order, names)
    ax.set_xlabel("epoch")
    ax.set_ylabel("classifier weight norm ||w_c||")
    ax.set_title("Per-class classifier weight norm over epochs")
    return fig


def forgetting_figure(scores: np.ndarray, labels: np.ndarray, order: list[int], names: list[str],
                      groups: list[str], epochs: int) -> Figure:
    k = len(order)
    means = class_mean(torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(labels), k).numpy()
    never = class_mean(torch.as_tensor(scores == epochs, dtype=torch.float64), torch.as_tensor(labels), k).numpy()
    fig = _figure()
    ax = fig.add_subplot()
    x = np.arange(k)
    ax.bar(x, means[order], color=[GROUP_COLOURS[groups[c]] for c in order])
    ax.set_xlabel("class (head → tail)")
    ax.set_ylabel("mean forgetting score (forgetting events)")
    _class_ticks(ax, [names[c] for c in order])
    ax2 = ax.twinx()
    ax2.plot(x, never[order], color="black", marker=".", lw=1)
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel("fraction never learnt (line)")
    ax.set_title(f"Per-class forgetting scores over {epochs} epochs")
    return fig


def montage_figure(images: torch.Tensor, labels: torch.Tensor, order: list[int], names: list[str],
                   per_class: int = 8) -> Figure:
    """skimage montage: one row per class (head at the top), its first training images."""
    from skimage.util import montage
    imgs = images.cpu()
    n, ch, h, w = imgs.shape
    tiles = np.zeros((len(order) * per_class, h, w, ch), dtype=np.float32)
    for row, c in enumerate(order):
        idx = (labels.cpu() == c).nonzero().flatten()[:per_class]
        for j, i in enumerate(idx.tolist()):
            tiles[row * per_class + j] = imgs[i].permute(1, 2, 0).float().numpy() / 255.0
    grid = montage(tiles, grid_shape=(len(order), per_class), channel_axis=-1, fill=(0.0,) * ch, padding_width=1)
    k = len(order)
    fig = _figure(min(8, 1 + per_class * 0.9), min(40, 1 + k * 0.9))
    ax = fig.add_subplot()
    ax.imshow(grid[..., 0] if ch == 1 else grid, cmap="gray" if ch == 1 else None, vmin=0, vmax=1,
              interpolation="nearest")
    step = grid.shape[0] / k
    shown = range(0, k, max(1, int(np.ceil(k / 25))))
    ax.set_yticks([step * (r + 0.5) for r in shown])
    ax.set_yticklabels([f"{names[order[r]]} ({int((labels.cpu() == order[r]).sum())})" for r in shown], fontsize=8)
    ax.set_xticks([])
    ax.set_ylabel("class (training images), head → tail")
    ax.set_title(f"Training images per class (first {per_class})")
    return fig


COLUMN_LABELS = {"test_acc": "test accuracy", "val_acc": "validation accuracy",
                 "weight_norm": "classifier weight norm ||w_c||", "test_feature_norm": "mean test feature norm",
                 "train_feature_norm": "mean train feature norm"}
PALETTE = ("#7f7f7f", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b")


def compare_runs_figure(frames: Sequence[pd.DataFrame], labels: Sequence[str], column: str,
                        title: Optional[str] = None) -> Figure:
    """Grouped bars of one per_class.csv column for several runs of the same
    classes, ordered head to tail by the first run's training counts."""
    base = frames[0]
    order = head_to_tail(base["n_train"].tolist())
    classes = base["class"].iloc[order].tolist()
    fig = _figure(9, 4.5)
    ax = fig.add_subplot()
    _group_spans(ax, base["group"].iloc[order].tolist())
    x = np.arange(len(classes))
    width = 0.8 / len(frames)
    for i, (df, label) in enumerate(zip(frames, labels)):
        values = df.set_index("class").loc[classes, column].to_numpy()
        extra = f" (All {np.mean(values):.3f})" if column.endswith("_acc") else ""
        ax.bar(x - 0.4 + width * (i + 0.5), values, width=width, label=f"{label}{extra}",
               color=PALETTE[i % len(PALETTE)])
    ax.set_xlabel("class (head → tail; shaded: Many / Medium / Few)")
    ax.set_ylabel(COLUMN_LABELS.get(column, column))
    if column.endswith("_acc"):
        ax.set_ylim(0, 1.05)
    ax.set_title(title or f"Per-class {COLUMN_LABELS.get(column, column)}")
    ax.legend(fontsize=8)
    _class_ticks(ax, base["name"].iloc[order].astype(str).tolist())
    return fig


def stage_comparison_figure(df: pd.DataFrame, df1: pd.DataFrame, acc_col: str) -> Figure:
    return compare_runs_figure([df1, df], ["stage 1", "this run (stage 2)"], acc_col,
                               "Per-class accuracy: stage 1 vs stage 2")


def plot_tau_sweep(rows: list[dict], best_tau: float, path: Path) -> Path:
    df = pd.DataFrame(rows)
    splits = [s for s in ("val", "test") if f"{s}_All" in df]
    fig = _figure(5 * len(splits), 4.5)
    for i, split in enumerate(splits):
        ax = fig.add_subplot(1, len(splits), i + 1)
        ax.plot(df["tau"], df[f"{split}_All"], color="black", marker="o", lw=2, label="All")
        for g in GROUPS:
            ax.plot(df["tau"], df[f"{split}_{g}"], color=GROUP_COLOURS[g], marker=".", label=g)
        ax.axvline(best_tau, color="grey", ls="--", lw=1, label=f"best tau {best_tau:g}")
        ax.set_xlabel("logit-adjustment tau")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{'Validation' if split == 'val' else 'Test'} accuracy vs tau")
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def reliability_figure(bins: dict, ece: float) -> Figure:
    """The reliability diagram of calibration.json's bins: accuracy per confidence bin against the
    diagonal of perfect calibration (empty bins not drawn), and how many images each bin holds."""
    lower, upper = np.asarray(bins["lower"]), np.asarray(bins["upper"])
    count = np.asarray(bins["count"])
    accuracy, confidence = np.asarray(bins["accuracy"]), np.asarray(bins["confidence"])
    width, centre, filled = upper - lower, (lower + upper) / 2, count > 0
    fig = _figure(5.5, 6.5)
    ax = fig.add_subplot(3, 1, (1, 2))
    ax.bar(centre[filled], accuracy[filled], width=width[filled], color="#1f77b4", edgecolor="black",
           label="accuracy")
    ax.bar(centre[filled], confidence[filled] - accuracy[filled], bottom=accuracy[filled], width=width[filled],
           color="#d62728", alpha=0.3, edgecolor="#d62728", label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability diagram ({len(count)} bins), ECE {ece:.4f}")
    ax.legend(fontsize=8, loc="upper left")
    hist = fig.add_subplot(3, 1, 3, sharex=ax)
    hist.bar(centre, count, width=width, color="grey", edgecolor="black")
    hist.set_xlabel("confidence (max softmax probability)")
    hist.set_ylabel("images")
    return fig
