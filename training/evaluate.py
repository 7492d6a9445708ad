"""Metrics (pure functions of labels and scores), operating threshold, and PNG plots."""
from __future__ import annotations

import io
import os

import numpy as np

from bonefrac.config import atomic_write_bytes


def _check(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(y).astype(int).ravel(), np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape} vs {p.shape}")
    if not set(np.unique(y)) <= {0, 1}:
        raise ValueError(f"labels must be 0/1, got {np.unique(y)}")
    return y, p


def roc_auc(y, p) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count half); NaN with a single class."""
    y, p = _check(y, p)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p))
    sorted_p = p[order]
    # Average ranks over ties.
    _, start, counts = np.unique(sorted_p, return_index=True, return_counts=True)
    avg = start + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(y, p) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds descending; a score >= threshold counts as positive."""
    y, p = _check(y, p)
    order = np.argsort(-p, kind="mergesort")
    y_sorted, p_sorted = y[order], p[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(p_sorted)), len(p) - 1]
    tps = np.cumsum(y_sorted)[last_of_value]
    fps = (last_of_value + 1) - tps
    tpr = np.r_[0.0, tps / max(1, y.sum())]
    fpr = np.r_[0.0, fps / max(1, (1 - y).sum())]
    thresholds = np.r_[np.inf, p_sorted[last_of_value]]
    return fpr, tpr, thresholds


def confusion_matrix(y, pred) -> np.ndarray:
    """[[TN, FP], [FN, TP]]."""
    y, pred = np.asarray(y).astype(int), np.asarray(pred).astype(int)
    return np.array([[np.sum((y == 0) & (pred == 0)), np.sum((y == 0) & (pred == 1))],
                     [np.sum((y == 1) & (pred == 0)), np.sum((y == 1) & (pred == 1))]])


def cohen_kappa(cm: np.ndarray) -> float:
    n = cm.sum()
    if n == 0:
        return float("nan")
    observed = np.trace(cm) / n
    expected = float((cm.sum(0) * cm.sum(1)).sum()) / n**2
    return float((observed - expected) / (1 - expected)) if expected < 1 else float("nan")


def binary_metrics(y, p, threshold: float) -> dict:
    """Accuracy, AUC, sensitivity, specificity, kappa and the confusion matrix at ``threshold``."""
    y, p = _check(y, p)
    cm = confusion_matrix(y, p >= threshold)
    (tn, fp), (fn, tp) = cm
    return {
        "n": int(len(y)),
        "positives": int(y.sum()),
        "threshold": float(threshold),
        "auc": roc_auc(y, p),
        "accuracy": float((tp + tn) / max(1, len(y))),
        "sensitivity": float(tp / (tp + fn)) if tp + fn else float("nan"),
        "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
        "kappa": cohen_kappa(cm),
        "confusion": cm.tolist(),
    }


def choose_threshold(y, p) -> float:
    """The threshold maximising Youden's J (sensitivity + specificity - 1) on these scores."""
    fpr, tpr, thresholds = roc_curve(y, p)
    finite = np.isfinite(thresholds)
    j = (tpr - fpr)[finite]
    return float(thresholds[finite][int(np.argmax(j))]) if finite.any() else 0.5


# ---- plots --------------------------------------------------------------------------------

def _save(fig, path: str | os.PathLike) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _figure(size=(5, 4), ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=size)


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike, points: dict[str, tuple[float, float]] | None = None) -> None:
    """curves: name -> (y, p); points: name -> (fpr, tpr) operating points to mark."""
    fig, ax = _figure()
    for name, (y, p) in curves.items():
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc(y, p):.3f}, n={len(y)})")
    for name, (x, yv) in (points or {}).items():
        ax.plot([x], [yv], "o", label=name)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def plot_confusion(cm, labels: list[str], path: str | os.PathLike, title: str = "Confusion matrix") -> None:
    cm = np.asarray(cm)
    fig, ax = _figure((4, 3.6))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=labels, yticklabels=labels, xlabel="predicted", ylabel="true", title=title)
    _save(fig, path)


def plot_learning_curves(history: list[dict], path: str | os.PathLike) -> None:
    fig, (ax1, ax2) = _figure((9, 3.6), ncols=2)
    epochs = [h["epoch"] for h in history]
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    ax1.plot(epochs, [h["val_loss"] for h in history], label="val loss")
    ax1.set(xlabel="epoch", ylabel="loss")
    ax1.legend()
    ax2.plot(epochs, [h["val_auc"] for h in history], label="val AUC")
    ax2.set(xlabel="epoch", ylabel="AUC")
    ax2.legend()
    _save(fig, path)
