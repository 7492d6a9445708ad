"""App start-up: from `python app.py` to the first answered request, and where the time goes.

    python -m benchmarks.startup [--runs 3]

Each run starts the real app in a fresh process. The app prints its own phases ("bonefrac: ready in
... (imports, model, warm-up, server)"); this script adds the first request (a fresh gradio_client
connection and one real X-ray) and a second request, so the first user's latency can be compared
with everyone's. It also times, in a fresh interpreter, the import of each library the app needs.
Medians over the runs; appends to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import publish, real_files
from benchmarks.load import ROOT, Server

READY = re.compile(r"bonefrac: ready in ([\d.]+) s \(imports ([\d.]+) s, model ([\d.]+) s, warm-up ([\d.]+) s, server ([\d.]+) s\)")
LIBRARIES = ("torch", "gradio", "torchvision", "pytorch_grad_cam")


def import_seconds(modules: tuple[str, ...]) -> dict[str, float]:
    """Seconds to import each of ``modules``, in this order, in one fresh interpreter (``-X importtime``:
    a dependency shared by two of them counts for the first)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import " + ", ".join(modules)], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    out = {}
    for line in proc.stderr.splitlines():  # "import time: self [us] | cumulative | name", nesting by indentation
        parts = line.split("|")
        if len(parts) == 3 and parts[2].strip() in modules and not parts[2][1:].startswith(" "):
            out[parts[2].strip()] = int(parts[1]) / 1e6
    return out


def one_run(images: list[Path], timeout: float = 180) -> dict:
    from gradio_client import Client, handle_file

    server = Server(Path(tempfile.mkdtemp(prefix="bonefrac-startup-")) / "gradio")
    try:
        deadline = time.time() + timeout
        while not (m := READY.search(server.output())):
            if server.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"app.py did not get ready: {server.output()[-2000:]}")
            time.sleep(0.02)
        ready = time.perf_counter() - server.started
        t = time.perf_counter()
        client = Client(server.url, verbose=False)
        client.predict(handle_file(str(images[0])), api_name="/predict")
        first = time.perf_counter() - t
        t = time.perf_counter()
        client.predict(handle_file(str(images[1])), api_name="/predict")
        second = time.perf_counter() - t
    finally:
        server.stop()
    app_total, imports, model, warm, srv = (float(v) for v in m.groups())
    return {"total": ready + first, "ready": ready, "interpreter": ready - app_total, "imports": imports, "model": model,
            "warm_up": warm, "server": srv, "first_request": first, "second_request": second}


def run(runs: int) -> dict:
    images = real_files(2)
    rows = [one_run(images) for _ in range(runs)]
    result = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    imports = [import_seconds(LIBRARIES) for _ in range(runs)]
    for lib in LIBRARIES:
        result[f"import {lib}"] = statistics.median(i[lib] for i in imports)
    result["runs"] = runs
    return result


def table(r: dict) -> str:
    lines = ["| phase | seconds (median of %d) |" % r["runs"], "|---|---|",
             f"| **spawn -> first answered request** | **{r['total']:.2f}** |",
             f"| interpreter start + until app.py runs | {r['interpreter']:.2f} |",
             f"| app.py imports (gradio, torch, bonefrac) | {r['imports']:.2f} |",
             f"| model load (torchvision import, safetensors, build) | {r['model']:.2f} |",
             f"| warm-up (grad-cam import, one blank explain) | {r['warm_up']:.2f} |",
             f"| Gradio UI build + server start | {r['server']:.2f} |",
             f"| first request (new client + one real X-ray) | {r['first_request']:.2f} |",
             f"| second request, same client | {r['second_request']:.2f} |"]
    lines += [f"| fresh-interpreter `import {lib}` (after the libraries above it) | {r['import ' + lib]:.2f} |" for lib in LIBRARIES]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--results", default=Path(__file__).with_name("RESULTS.md"), help="markdown file to append to ('': none)")
    args = p.parse_args(argv)
    publish(args.results, "App start-up (CPU)", "benchmarks.startup", argv, table(run(args.runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
