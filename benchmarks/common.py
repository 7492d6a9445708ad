"""Shared bits of the benchmarks: real input files, a machine description, appending to RESULTS.md."""
from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from pathlib import Path

DATA = Path(os.environ.get("BONEFRAC_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def real_files(n: int) -> list[Path]:
    """The first ``n`` FracAtlas JPEGs (sorted), read from ../shared/data; never copied into the repo."""
    files = sorted((DATA / "fracatlas").rglob("*.jpg"))
    if not files:
        raise SystemExit(f"error: no real X-rays under {DATA / 'fracatlas'} (set BONEFRAC_DATA)")
    return files[:n]


def machine_line() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads){gpu}"


def publish(path: Path | str | None, title: str, module: str, argv: list[str] | None, table: str) -> None:
    """Print a benchmark's table and append it, with the command, machine and date, to ``path``
    (RESULTS.md; an empty path appends nothing)."""
    import sys

    from bonefrac.config import atomic_write_text

    print(table, end="")
    if not path or str(path) in ("", "."):
        return
    path = Path(path)
    command = f"python -m {module} " + " ".join(argv if argv is not None else sys.argv[1:])
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n\nAppended by the scripts in benchmarks/; newest last.\n"
    atomic_write_text(path, f"{old.rstrip()}\n\n## {title}, {stamp}\n\n`{command}`  \n{machine_line()}\n\n{table}")


def installed_photos() -> list[Path]:
    """Real colour photographs that ship inside installed packages (scikit-learn, matplotlib, gradio):
    the offline stand-in for "a user uploads a photo instead of an X-ray"."""
    import importlib.util

    wanted = {"sklearn": ["datasets/images/china.jpg", "datasets/images/flower.jpg"],
              "matplotlib": ["mpl-data/sample_data/grace_hopper.jpg"],
              "gradio": ["media_assets/images/cheetah.jpg", "media_assets/images/cheetah1.jpg", "media_assets/images/lion.jpg",
                         "media_assets/images/tower.jpg", "media_assets/images/groot.jpeg", "test_data/cheetah2.jpg"]}
    found = []
    for package, names in wanted.items():
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.origin:
            continue
        root = Path(spec.origin).parent
        found += [root / n for n in names if (root / n).is_file()]
    return found
