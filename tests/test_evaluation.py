"""Honest evaluation (#6): calibration, thresholds for a target, bootstrap intervals, group-aware splits, the audit."""
import csv
import shutil

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from tests.conftest import FRACATLAS, MULTIREGION
from training.audit import NEAR_DUPLICATE_DISTANCE, audit, hash_file, hamming, main as audit_main
from training.data import group_split, kfold_assignments, scan_dataset
from training.evaluate import (binary_metrics, binary_nll, bootstrap_ci, calibration_bins, choose_threshold,
                               expected_calibration_error, fit_platt, fit_temperature, parse_threshold_rule, sigmoid)


def _synthetic(n=4000, temperature=2.5, bias=-1.0, seed=0):
    rng = np.random.default_rng(seed)
    margin = rng.normal(0, 3, n)
    y = (rng.random(n) < sigmoid(margin / temperature + bias)).astype(int)
    return y, margin


def test_fit_platt_recovers_the_generating_calibration_and_matches_sklearn():
    y, margin = _synthetic()
    t, b = fit_platt(y, margin)
    assert t == pytest.approx(2.5, rel=0.1) and b == pytest.approx(-1.0, abs=0.15)
    ref = LogisticRegression(C=1e9, tol=1e-10, max_iter=1000).fit(margin[:, None], y)
    assert 1 / t == pytest.approx(ref.coef_[0, 0], rel=1e-4) and b == pytest.approx(ref.intercept_[0], abs=1e-4)
    # It lowers the NLL and the ECE, and never changes the ranking.
    p_raw, p_cal = sigmoid(margin), sigmoid(margin / t + b)
    assert binary_nll(y, margin / t + b) < binary_nll(y, margin)
    assert expected_calibration_error(y, p_cal) < 0.03 < expected_calibration_error(y, p_raw)
    assert roc_auc_score(y, p_cal) == pytest.approx(roc_auc_score(y, p_raw))


def test_fit_temperature_alone():
    y, margin = _synthetic(bias=0.0, seed=1)
    t = fit_temperature(y, margin)
    assert t == pytest.approx(2.5, rel=0.1)
    grid = [binary_nll(y, margin, t * f) for f in (0.9, 1.0, 1.1)]
    assert grid[1] <= min(grid[0], grid[2])
    assert fit_platt(np.ones(10), np.arange(10.0)) == (1.0, 0.0)  # one class: nothing to fit


def test_ece_by_hand():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.05, 0.05, 0.95, 0.55])  # bins 0 (mean .05, observed 0), 9 (.95, 1), 5 (.55, 1)
    assert expected_calibration_error(y, p) == pytest.approx((2 * 0.05 + 0.05 + 0.45) / 4)
    assert sum(b["n"] for b in calibration_bins(y, p)) == 4


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_threshold_for_a_sensitivity_target(target):
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    t = choose_threshold(y, p, f"sensitivity:{target}")
    assert binary_metrics(y, p, t)["sensitivity"] >= target
    # The highest such threshold: the next score above it loses the target.
    above = np.unique(p[p > t])
    assert len(above) == 0 or binary_metrics(y, p, above[0])["sensitivity"] < target
    s = choose_threshold(y, p, f"specificity:{target}")
    assert binary_metrics(y, p, s)["specificity"] >= target


@pytest.mark.parametrize("bad", ["", "sensitivity", "sensitivity:1.5", "recall:0.9", "youden:1"])
def test_threshold_rule_errors(bad):
    with pytest.raises(ValueError, match="threshold rule must be"):
        parse_threshold_rule(bad)


def test_bootstrap_ci_brackets_the_estimate_and_its_auc_is_right():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.round(np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0, 1), 2)  # with ties
    point = binary_metrics(y, p, 0.5)
    ci = bootstrap_ci(y, p, 0.5, n_boot=500, seed=1)
    for k, (lo, hi) in ci.items():
        assert lo <= point[k] <= hi and hi - lo > 0.01, k
    assert ci == bootstrap_ci(y, p, 0.5, n_boot=500, seed=1)  # seeded
    # The vectorised per-resample AUC equals sklearn's on the same resamples.
    from training.evaluate import _rankdata_rows

    idx = np.random.default_rng(5).integers(0, 300, (4, 300))
    ranks = _rankdata_rows(p[idx])
    for row, r in zip(idx, ranks):
        yb = y[row]
        pos = yb.sum()
        auc = (r[yb == 1].sum() - pos * (pos + 1) / 2) / (pos * (len(yb) - pos))
        assert auc == pytest.approx(roc_auc_score(yb, p[row]))


def test_group_split_keeps_mixed_label_groups_whole():
    """The old per-label assignment could send the two labels of one duplicate group to different splits."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    groups = np.arange(400)
    groups[1::2] = groups[::2]  # pairs, many with mixed labels
    for seed in range(5):
        out = group_split(labels, (0.7, 0.1, 0.2), seed, groups, ["train", "val", "test"])
        for g in np.unique(groups):
            assert len(set(out[groups == g])) == 1
        for name, frac in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
            assert abs((out == name).mean() - frac) < 0.03


def test_kfold_folds_partition_stratify_and_respect_groups():
    rng = np.random.default_rng(1)
    labels = (rng.random(600) < 0.2).astype(int)
    groups = rng.integers(0, 450, 600)
    folds = kfold_assignments(labels, 5, seed=0, groups=groups)
    assert set(folds) == set(range(5))
    for g in np.unique(groups):
        assert len(set(folds[groups == g])) == 1
    for f in range(5):
        assert abs((folds == f).mean() - 0.2) < 0.03
        assert abs(labels[folds == f].mean() - labels.mean()) < 0.05
    with pytest.raises(ValueError, match="k >= 2"):
        kfold_assignments(labels, 1, 0)


# ---- the audit on real radiographs ------------------------------------------------------------

# Found by `python -m training.audit ../shared/data/fracatlas ../shared/data/multiregion`.
EXACT_ACROSS_DATASETS = (FRACATLAS / "fractured" / "IMG0002180.jpg", MULTIREGION / "train" / "fractured" / "IMG0002180.jpg")
NEAR_WITHIN_FRACATLAS = (FRACATLAS / "fractured" / "IMG0004266.jpg", FRACATLAS / "fractured" / "IMG0002945.jpg")
DISTINCT_NEIGHBOURS = (FRACATLAS / "not_fractured" / "IMG0000236.jpg", FRACATLAS / "not_fractured" / "IMG0000237.jpg")


def _distance(a, b) -> int:
    (ra, _, ha), (rb, _, hb) = hash_file(str(a)), hash_file(str(b))
    assert not ra and not rb, (ra, rb)
    return int(hamming(ha[:1], hb).min())


def test_audit_distances_on_real_pairs(real_data):
    (r1, s1, _), (r2, s2, _) = hash_file(str(EXACT_ACROSS_DATASETS[0])), hash_file(str(EXACT_ACROSS_DATASETS[1]))
    assert not r1 and not r2 and s1 == s2
    near = _distance(*NEAR_WITHIN_FRACATLAS)
    assert near <= NEAR_DUPLICATE_DISTANCE
    assert hash_file(str(NEAR_WITHIN_FRACATLAS[0]))[1] != hash_file(str(NEAR_WITHIN_FRACATLAS[1]))[1]
    # Two different radiographs of one patient's hand, taken in sequence: similar, but not a copy.
    assert _distance(*DISTINCT_NEIGHBOURS) > NEAR_DUPLICATE_DISTANCE


def test_audit_catches_resized_flipped_and_rotated_copies(real_data, tmp_path):
    src = FRACATLAS / "fractured" / "IMG0000019.jpg"
    img = Image.open(src).convert("L")
    others = sorted((FRACATLAS / "not_fractured").glob("IMG00001*.jpg"))[:6]
    root = tmp_path / "ds"
    for sub in ("train/fractured", "train/not_fractured", "test/fractured", "test/not_fractured"):
        (root / sub).mkdir(parents=True)
    shutil.copy(src, root / "train/fractured/original.jpg")
    img.resize((img.width // 3, img.height // 3)).save(root / "test/fractured/small.png")
    img.transpose(Image.Transpose.ROTATE_90).save(root / "test/fractured/rot90.jpg", quality=70)
    img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "test/not_fractured/mirrored_relabelled.jpg")
    for i, o in enumerate(others):
        shutil.copy(o, root / ("train" if i < 3 else "test") / "not_fractured" / o.name)
    report = audit(scan_dataset(root), workers=1, progress=False)
    leak = report["held_out_with_copy_in_train"][f"{root.name}/test"]
    assert leak == {"images": 6, "with_copy_in_train": 3, "exact": 0}
    assert report["groups_under_both_labels"] == 1 and report["images_under_both_labels"] == 4
    assert report["duplicate_groups"] == 1 and report["largest_group"] == 4

    out = tmp_path / "groups.csv"
    assert audit_main([str(root), "--csv", str(out), "--workers", "1", "--no-progress"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert sorted(r["path"].rsplit("/", 1)[1] for r in rows) == ["mirrored_relabelled.jpg", "original.jpg", "rot90.jpg", "small.png"]
    assert {r["group"] for r in rows} == {"0"} and all(r["both_labels"] == "True" for r in rows)


@pytest.mark.slow
def test_audit_pins_the_multiregion_leak(real_data):
    """The Kaggle multi-region test split is almost entirely copies of its training split."""
    report = audit(scan_dataset(MULTIREGION), workers=2, progress=False)
    leak = report["held_out_with_copy_in_train"]["multiregion/test"]
    assert leak["images"] == 434 and leak["exact"] == 424 and leak["with_copy_in_train"] >= 428
