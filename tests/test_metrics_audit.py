import numpy as np
import pytest
from PIL import Image, ImageOps
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from bonefrac.imaging import load_image
from training.audit import dihedral_hashes, duplicate_groups, find_leaks, hamming
from training.evaluate import binary_metrics, choose_threshold, confusion_matrix, roc_auc, roc_curve
from training.train import balanced_class_weights, lr_at


@pytest.mark.parametrize("seed", range(3))
def test_auc_and_kappa_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    p = np.round(rng.random(300) * 0.5 + y * 0.3, 2)  # with ties
    assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    m = binary_metrics(y, p, 0.5)
    assert m["kappa"] == pytest.approx(cohen_kappa_score(y, p >= 0.5))
    (tn, fp), (fn, tp) = m["confusion"]
    assert m["sensitivity"] == tp / (tp + fn) and m["specificity"] == tn / (tn + fp)
    assert tn + fp + fn + tp == 300


def test_roc_curve_and_threshold():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.6, 0.4, 0.8, 0.9])
    fpr, tpr, thr = roc_curve(y, p)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    t = choose_threshold(y, p)
    assert t in p
    m = binary_metrics(y, p, t)
    assert m["sensitivity"] + m["specificity"] - 1 == pytest.approx(max(tpr - fpr))
    assert confusion_matrix(y, p >= 2).tolist() == [[3, 0], [3, 0]]
    assert np.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_lr_schedule():
    lrs = [lr_at(s, 100, 10, 1.0, 0.01) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.01, abs=1e-3)


def test_balanced_class_weights():
    w = balanced_class_weights(np.array([0] * 80 + [1] * 20))
    assert w.tolist() == pytest.approx([1000 / 1600, 1000 / 400])


def test_perceptual_hash_catches_transformed_copies(good_images):
    original = load_image(good_images[0])
    other = load_image(good_images[2])
    copies = [original.resize((original.width // 3, original.height // 3)), ImageOps.mirror(original),
              original.transpose(Image.Transpose.ROTATE_90), ImageOps.autocontrast(original)]
    held = dihedral_hashes(original)[None]
    cand = np.stack([dihedral_hashes(c) for c in copies + [other]])
    leak = find_leaks(["a", "b", "c", "d", "e"], cand, ["z"], held)
    assert leak.tolist() == [True, True, True, True, False]
    assert hamming(held[:, 0], cand[-1:, 0])[0, 0] > 8
    # exact copies by content hash, even when the perceptual hashes differ
    assert find_leaks(["z"], cand[-1:], ["z"], held).tolist() == [True]
    groups = duplicate_groups(["a", "b", "c", "x"], np.stack([held[0], cand[1], cand[2], cand[4]]))
    assert groups[0] == groups[1] == groups[2] != groups[3]
    same_bytes = duplicate_groups(["q", "q"], np.stack([held[0], cand[4]]))
    assert same_bytes[0] == same_bytes[1]
