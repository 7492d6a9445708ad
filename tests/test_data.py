import csv
import hashlib

import numpy as np
import pytest
from PIL import Image

from training.data import check_file, label_from_folder, main as data_main, restore, scan_dataset, stratified_split

from .conftest import GIF_NAMED_JPG, PALETTE_PNG, RGBA_PNG, TRUNCATED_JPEG, make_dataset

BAD = {TRUNCATED_JPEG: "truncated", GIF_NAMED_JPG: "GIF content named .jpg", PALETTE_PNG: "unsupported mode P",
       RGBA_PNG: "unsupported mode RGBA"}


@pytest.mark.parametrize("name, label", [("fractured", 1), ("Fracture", 1), ("not fractured", 0), ("not_fractured", 0),
                                         ("Normal", 0), ("NOT-FRACTURED", 0), ("fractures", 1)])
def test_label_aliases(name, label):
    assert label_from_folder(name) == label


def test_unknown_class_folder_is_a_clear_error(tmp_path):
    (tmp_path / "maybe").mkdir()
    Image.new("L", (32, 32)).save(tmp_path / "maybe" / "a.png")
    with pytest.raises(ValueError, match="class folder 'maybe' is not a known label"):
        scan_dataset(tmp_path)


def test_scan_real_layouts(real_data):
    flat = scan_dataset(real_data / "fracatlas")
    assert len(flat) > 3000 and {s.split for s in flat} == {None}
    assert sum(s.label for s in flat) == len(list((real_data / "fracatlas" / "fractured").iterdir()))
    split = scan_dataset(real_data / "multiregion")
    assert {s.split for s in split} == {"train", "test"}
    assert any("not fractured" in str(s.path) and s.label == 0 for s in split)


def test_check_file_on_real_files(good_images):
    assert check_file(good_images[0]) is None
    for path, reason in BAD.items():
        assert reason in check_file(path)


def _tree(root):
    return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def test_cleanup_quarantines_real_corrupt_files(tmp_path, good_images, capsys):
    ds = make_dataset(tmp_path / "ds", {"fractured": [GIF_NAMED_JPG, PALETTE_PNG, RGBA_PNG, *good_images[:2]],
                                        "not_fractured": [TRUNCATED_JPEG, *good_images[2:]]})
    before = _tree(ds)
    (ds / "fractured" / "empty.png").write_bytes(b"")
    (ds / "not_fractured" / "notes.jpg").write_text("radiology report, not an image")

    # Dry run: reports, moves nothing.
    assert data_main(["clean", str(ds), "--dry-run", "--workers", "1"]) == 0
    out = capsys.readouterr()
    assert "6 of 10 files unusable" in out.err
    assert len(_tree(ds)) == 10

    q = tmp_path / "quarantine"
    assert data_main(["clean", str(ds), "--quarantine", str(q), "--workers", "1"]) == 0
    rows = list(csv.DictReader((q / "manifest.csv").open()))
    assert len(rows) == 6
    reasons = {r["original_path"].rsplit("/", 1)[-1]: r["reason"] for r in rows}
    assert "truncated" in reasons[TRUNCATED_JPEG.name]
    assert "GIF" in reasons[GIF_NAMED_JPG.name]
    assert "mode P" in reasons[PALETTE_PNG.name] and "mode RGBA" in reasons[RGBA_PNG.name]
    assert "empty" in reasons["empty.png"] and "not an image" in reasons["notes.jpg"]
    # Nothing deleted: every byte is either still in place or in quarantine.
    remaining, quarantined = _tree(ds), {p: h for p, h in _tree(q).items() if p.name != "manifest.csv"}
    assert len(remaining) == 4 and len(quarantined) == 6
    assert sorted(before.values()) == sorted(h for h in list(remaining.values()) + list(quarantined.values()) if h in before.values())
    for r in rows:
        assert hashlib.sha256(open(r["quarantined_path"], "rb").read()).hexdigest() == r["sha256"]

    # And it is reversible.
    assert restore(q / "manifest.csv") == 6
    assert len(_tree(ds)) == 10 and all(_tree(ds)[k] == v for k, v in before.items())


def test_stratified_split_is_seeded_stratified_and_keeps_groups():
    labels = np.array([0] * 800 + [1] * 200)
    groups = np.arange(1000) // 4  # groups of 4 near-copies
    a = stratified_split(labels, (0.7, 0.1, 0.2), seed=1, groups=groups)
    b = stratified_split(labels, (0.7, 0.1, 0.2), seed=1, groups=groups)
    assert (a == b).all()
    assert not (a == stratified_split(labels, (0.7, 0.1, 0.2), seed=2, groups=groups)).all()
    for split, frac in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        assert abs((a == split).mean() - frac) < 0.02
        assert abs(labels[a == split].mean() - 0.2) < 0.02
    for g in np.unique(groups):
        assert len(set(a[groups == g])) == 1
