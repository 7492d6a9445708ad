"""Call a running bonefrac app (local or a Hugging Face Space) from a script.

    python scripts/client.py xray.png [more.png ...] [--url http://127.0.0.1:7860] [--overlay-dir out/]
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from gradio_client import Client, handle_file


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--url", default="http://127.0.0.1:7860", help="app URL or Space id (user/space)")
    p.add_argument("--overlay-dir", type=Path, help="save each Grad-CAM overlay here as NAME.gradcam.png")
    args = p.parse_args(argv)
    client = Client(args.url, verbose=False)
    status = 0
    for image in args.images:
        try:
            label, overlay, decision = client.predict(handle_file(str(image)), api_name="/predict")
        except Exception as e:  # the app answers bad inputs with a one-line message
            print(f"{image}\terror: {e}")
            status = 1
            continue
        probs = {c["label"]: c["confidence"] for c in label["confidences"]}
        print(f"{image}\tfractured={probs['fractured']:.4f}\tprediction={label['label']}")
        if args.overlay_dir:
            args.overlay_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(overlay, args.overlay_dir / f"{image.stem}.gradcam.png")
    return status


if __name__ == "__main__":
    sys.exit(main())
