import csv
import subprocess
import sys

import pytest

from bonefrac.__main__ import main

from .conftest import ROOT, TRUNCATED_JPEG, make_dataset


@pytest.fixture
def folder(tmp_path, good_images):
    ds = make_dataset(tmp_path / "xrays", {"a": good_images[:2], "b/deeper": good_images[2:] + [TRUNCATED_JPEG]})
    (ds / "b" / "fake.png").write_text("not an image at all")
    (ds / "b" / "notes.txt").write_text("ignored: not an image extension")
    return ds


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_contract_subprocess(folder, tiny_model_dir, tmp_path):
    out = tmp_path / "pred.csv"
    proc = subprocess.run([sys.executable, "-m", "bonefrac", "predict", str(folder), "--model", str(tiny_model_dir), "--csv", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = _read(out)
    assert len(rows) == 6  # 4 good + truncated + fake.png; notes.txt is not an image file
    assert {"path", "fractured", "prediction", "error"} <= set(rows[0])
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in rows}
    bad = by_name[TRUNCATED_JPEG.name]
    assert "truncated" in bad["error"] and bad["fractured"] == "" and bad["prediction"] == ""
    assert "not a recognised image" in by_name["fake.png"]["error"]
    good = [r for r in rows if not r["error"]]
    assert len(good) == 4
    for r in good:
        assert 0.0 <= float(r["fractured"]) <= 1.0
        assert r["prediction"] in ("fractured", "not fractured")
    assert "4 fractured" in proc.stderr or "unreadable" in proc.stderr


def test_cli_stdout_and_explicit_files(good_images, tiny_model_dir, capsys):
    assert main(["predict", str(good_images[0]), "/nonexistent.png", "--model", str(tiny_model_dir), "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("path,fractured")
    assert len(lines) == 3 and "no such file" in lines[2]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["predict", str(tmp_path)]) == 2
    assert "no image files" in capsys.readouterr().err
    (tmp_path / "x.png").write_bytes(b"")
    assert main(["predict", str(tmp_path), "--model", str(tmp_path / "missing_model_dir" / "a" / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model source") and err.count("\n") == 1
