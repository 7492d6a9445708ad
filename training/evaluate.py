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


def choose_threshold(y, p, rule: str = "youden") -> float:
    """The decision threshold on these (validation) scores for a stated target.

    ``youden``: maximise sensitivity + specificity - 1. ``sensitivity:0.9``: the highest threshold
    whose sensitivity is >= 0.9 (so the best specificity that keeps the target). ``specificity:0.9``:
    the lowest threshold whose specificity is >= 0.9.
    """
    kind, target = parse_threshold_rule(rule)
    fpr, tpr, thresholds = roc_curve(y, p)
    finite = np.isfinite(thresholds)
    if not finite.any():
        return 0.5
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if kind == "youden":
        return float(thresholds[int(np.argmax(tpr - fpr))])
    if kind == "sensitivity":
        ok = np.flatnonzero(tpr >= target - 1e-12)  # thresholds descend, tpr ascends
        return float(thresholds[ok[0]]) if len(ok) else float(thresholds[-1])
    ok = np.flatnonzero(1 - fpr >= target - 1e-12)
    return float(thresholds[ok[-1]]) if len(ok) else float(thresholds[0])


def parse_threshold_rule(rule: str) -> tuple[str, float]:
    """'youden' | 'sensitivity:0.9' | 'specificity:0.85' -> (kind, target); a clear error otherwise."""
    kind, _, value = str(rule).partition(":")
    kind = kind.strip().lower()
    if kind == "youden" and not value:
        return kind, 0.0
    try:
        target = float(value)
    except ValueError:
        target = -1.0
    if kind not in ("sensitivity", "specificity") or not 0 < target <= 1:
        raise ValueError(f"threshold rule must be 'youden', 'sensitivity:T' or 'specificity:T' with 0 < T <= 1, got {rule!r}")
    return kind, target


# ---- calibration ---------------------------------------------------------------------------

def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def binary_nll(y, margin, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of labels under P(positive) = sigmoid(margin / temperature).

    ``margin`` is logit[positive] - logit[negative]: a two-class softmax is a sigmoid of it.
    """
    y = np.asarray(y, dtype=np.float64)
    z = np.asarray(margin, dtype=np.float64) / temperature
    return float(np.mean(np.logaddexp(0.0, -z) * y + np.logaddexp(0.0, z) * (1 - y)))


def fit_temperature(y, margin, low: float = 0.05, high: float = 20.0) -> float:
    """The temperature minimising the NLL on these (validation) scores (Guo et al., 2017).

    One parameter, fitted by a log-spaced grid then golden-section search (the NLL is unimodal in
    log T); deterministic and dependency-free. Temperature never changes the ranking, so AUC is unchanged.
    """
    y, margin = _check(y, margin)
    if len(np.unique(y)) < 2:
        return 1.0
    grid = np.linspace(np.log(low), np.log(high), 61)
    losses = [binary_nll(y, margin, np.exp(t)) for t in grid]
    i = int(np.argmin(losses))
    a, b = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
    golden = (np.sqrt(5) - 1) / 2
    for _ in range(60):
        c, d = b - golden * (b - a), a + golden * (b - a)
        if binary_nll(y, margin, np.exp(c)) < binary_nll(y, margin, np.exp(d)):
            b = d
        else:
            a = c
    return float(np.exp((a + b) / 2))


def fit_platt(y, margin, iterations: int = 100) -> tuple[float, float]:
    """(temperature, logit_bias) minimising the NLL of P = sigmoid(margin / temperature + logit_bias)
    on these (validation) scores: Platt scaling, by Newton's method on (1/temperature, bias).

    Temperature alone cannot correct a shift of the base rate, and a model trained with
    class-balanced loss weights predicts as if half the images were fractured; the bias puts the
    probabilities back on the validation data's base rate. A monotone map, so AUC is unchanged.
    """
    y, margin = _check(y, margin)
    if len(np.unique(y)) < 2:
        return 1.0, 0.0
    X = np.stack([margin, np.ones_like(margin)], axis=1)

    def loss(w):
        return binary_nll(y, X @ w)

    w = np.array([1.0, 0.0])
    current = loss(w)
    for _ in range(iterations):
        q = sigmoid(X @ w)
        grad = X.T @ (q - y) / len(y)
        hess = (X * (q * (1 - q))[:, None]).T @ X / len(y) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while loss(w - scale * step) > current and scale > 1e-6:  # damped Newton: never go uphill
            scale /= 2
        w = w - scale * step
        previous, current = current, loss(w)
        if previous - current < 1e-12:
            break
    if not np.all(np.isfinite(w)) or w[0] <= 1e-3:  # separable or anti-correlated scores: keep the raw model
        return 1.0, 0.0
    return float(1.0 / w[0]), float(w[1])


def calibration_bins(y, p, n_bins: int = 10) -> list[dict]:
    """Equal-width bins of P(positive): count, mean predicted probability, observed positive rate."""
    y, p = _check(y, p)
    idx = np.minimum((p * n_bins).astype(int), n_bins - 1)
    out = []
    for b in range(n_bins):
        m = idx == b
        out.append({"low": b / n_bins, "high": (b + 1) / n_bins, "n": int(m.sum()),
                    "mean_predicted": float(p[m].mean()) if m.any() else float("nan"),
                    "observed": float(y[m].mean()) if m.any() else float("nan")})
    return out


def expected_calibration_error(y, p, n_bins: int = 10) -> float:
    """ECE of P(positive): the count-weighted mean |mean predicted - observed rate| over equal-width bins."""
    bins = calibration_bins(y, p, n_bins)
    n = sum(b["n"] for b in bins)
    return float(sum(b["n"] * abs(b["mean_predicted"] - b["observed"]) for b in bins if b["n"]) / max(1, n))


# ---- confidence intervals ----------------------------------------------------------------

CI_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "kappa")


def bootstrap_ci(y, p, threshold: float, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap confidence intervals (resampling images with replacement) for every
    metric of :func:`binary_metrics`: {metric: [low, high]}. Seeded, so a report is reproducible."""
    y, p = _check(y, p)
    n = len(y)
    if n == 0:
        return {k: [float("nan"), float("nan")] for k in CI_METRICS}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    yb, pb = y[idx], p[idx]
    pred = pb >= threshold
    tp = (pred & (yb == 1)).sum(1)
    tn = (~pred & (yb == 0)).sum(1)
    pos = yb.sum(1)
    neg = n - pos
    fp, fn = neg - tn, pos - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = (tp + tn) / n
        sens = np.where(pos > 0, tp / pos, np.nan)
        spec = np.where(neg > 0, tn / neg, np.nan)
        expected = ((tp + fp) * pos + (tn + fn) * neg) / n**2
        kappa = np.where(expected < 1, (acc - expected) / (1 - expected), np.nan)
        # AUC per resample from ranks of the resampled scores (ties count half).
        ranks = _rankdata_rows(pb)
        auc = np.where((pos > 0) & (neg > 0), ((ranks * (yb == 1)).sum(1) - pos * (pos + 1) / 2) / (pos * neg), np.nan)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {}
    for name, values in zip(CI_METRICS, (auc, acc, sens, spec, kappa)):
        v = values[np.isfinite(values)]
        out[name] = [float(np.percentile(v, lo)), float(np.percentile(v, hi))] if len(v) else [float("nan")] * 2
    return out


def _rankdata_rows(a: np.ndarray) -> np.ndarray:
    """Average ranks (1-based, ties averaged) along each row of a 2-D array."""
    order = np.argsort(a, axis=1, kind="mergesort")
    sorted_a = np.take_along_axis(a, order, axis=1)
    n = a.shape[1]
    pos = np.broadcast_to(np.arange(1, n + 1, dtype=np.float64), a.shape)
    # For runs of equal values, replace each position by the mean position of its run.
    new_run = np.ones(a.shape, dtype=bool)
    new_run[:, 1:] = sorted_a[:, 1:] != sorted_a[:, :-1]
    run_id = np.cumsum(new_run, axis=1) - 1
    flat = run_id + (np.arange(a.shape[0]) * n)[:, None]
    sums = np.bincount(flat.ravel(), weights=pos.ravel(), minlength=a.size)
    counts = np.bincount(flat.ravel(), minlength=a.size)
    mean_pos = (sums / np.maximum(counts, 1))[flat]
    ranks = np.empty_like(mean_pos)
    np.put_along_axis(ranks, order, mean_pos, axis=1)
    return ranks


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


def plot_reliability(y, curves: dict[str, np.ndarray], path: str | os.PathLike, n_bins: int = 10, title: str = "Reliability (test)") -> None:
    """Observed fracture rate against mean predicted probability per bin, one line per curve name."""
    fig, ax = _figure((4.6, 4.2))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    for name, p in curves.items():
        bins = [b for b in calibration_bins(y, p, n_bins) if b["n"]]
        ece = expected_calibration_error(y, p, n_bins)
        ax.plot([b["mean_predicted"] for b in bins], [b["observed"] for b in bins], "o-", label=f"{name} (ECE {ece:.3f})")
    ax.set(xlabel="predicted P(fractured)", ylabel="observed fraction fractured", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
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
