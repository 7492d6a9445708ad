"""bonefrac web demo: upload an X-ray, get fracture probabilities and a Grad-CAM overlay.

Run ``python app.py`` (http://127.0.0.1:7860; GRADIO_SERVER_NAME / GRADIO_SERVER_PORT override).
The model comes from $BONEFRAC_MODEL (a folder or a Hub repo id ``user/repo[@revision]``),
default the bundled ``model/``. Scripts call the same endpoint::

    from gradio_client import Client, handle_file
    label, overlay, decision = Client("http://127.0.0.1:7860").predict(handle_file("xray.png"), api_name="/predict")
"""
from __future__ import annotations

import time

_STARTED = time.perf_counter()  # before the heavy imports, for the start-up line

import os  # noqa: E402
import threading  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
from gradio.utils import get_upload_folder  # noqa: E402

from bonefrac import FracturePredictor, ImageDecodeError, load_image  # noqa: E402
from bonefrac.imaging import IMAGE_EXTENSIONS  # noqa: E402

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
MAX_FILE_SIZE = "30mb"
CONCURRENCY = 2  # Grad-CAM is serialised per model; two workers overlap decoding with it
# Gradio stores identical uploads at one path, so the file a request is done with may be the file a
# queued request (another user, or a double click) is about to read. It is deleted once no request
# holds it and this many seconds have passed (the queue holds at most 64, about 10 s of work).
UPLOAD_GRACE_S = float(os.environ.get("BONEFRAC_UPLOAD_GRACE_S", "60"))
DISCLAIMER = ("**Decision support only: not a medical device.** The probability and heat map come from a "
              "research model and can be wrong. Never use them to diagnose, treat or rule out a fracture.")


def _upload_path(upload) -> str | None:
    if upload is None:
        return None
    if isinstance(upload, (str, os.PathLike)):
        return os.fspath(upload)
    return getattr(upload, "path", None) or upload.name  # a FileData / tempfile-like object


def _threshold_words(config) -> str:
    kind, _, target = str(config.extra.get("training", {}).get("threshold_rule", "")).partition(":")
    if kind in ("sensitivity", "specificity") and target:
        return f"a threshold chosen on validation data to keep {kind} at {float(target):.0%} or more"
    return "threshold chosen on validation data"


def _forget(path: str | None) -> None:
    """Uploads are not kept after the request: remove Gradio's cached copy of the uploaded file.

    Only files inside Gradio's upload folder are touched, and never the cached copies of examples/.
    """
    if not path:
        return
    p = Path(path).resolve()
    if not p.is_relative_to(Path(get_upload_folder()).resolve()) or not p.is_file():
        return
    example = EXAMPLES_DIR / p.name
    if example.is_file() and example.stat().st_size == p.stat().st_size and example.read_bytes() == p.read_bytes():
        return
    p.unlink()


class _Uploads:
    """Reference-counted deletion of uploads: deleted when no request holds them and the grace has passed."""

    def __init__(self):
        self._lock = threading.Lock()
        self._in_use: Counter[str] = Counter()
        self._due: dict[str, float] = {}
        self._janitor: threading.Thread | None = None

    def acquire(self, path: str) -> None:
        with self._lock:
            self._in_use[path] += 1
            self._due.pop(path, None)

    def release(self, path: str) -> None:
        with self._lock:
            self._in_use[path] -= 1
            if self._in_use[path] > 0:
                return
            del self._in_use[path]
            if UPLOAD_GRACE_S > 0:
                self._due[path] = time.monotonic() + UPLOAD_GRACE_S
                if self._janitor is None:
                    self._janitor = threading.Thread(target=self._sweep, name="bonefrac-uploads", daemon=True)
                    self._janitor.start()
                return
        _forget(path)

    def _sweep(self) -> None:
        while True:
            time.sleep(1.0)
            now = time.monotonic()
            with self._lock:
                expired = [p for p, due in self._due.items() if due <= now]
                for p in expired:
                    del self._due[p]
            for p in expired:
                try:
                    _forget(p)
                except OSError:  # already gone (Gradio's own cache cleanup); nothing left to protect
                    pass


def make_handlers(predictor: FracturePredictor):
    """(predict, preview, reblend): the public endpoint; the input preview; the opacity slider's re-blend."""
    from bonefrac.explain import overlay as blend

    config = predictor.config
    uploads = _Uploads()

    def predict(upload, opacity: float = 0.4):
        path = _upload_path(upload)
        if path is None:
            raise gr.Error("No image: upload an X-ray (PNG, JPEG, TIFF, BMP or WebP).")
        uploads.acquire(path)
        try:
            if not Path(path).exists():
                raise gr.Error("This upload was discarded after it was analysed (uploads are not kept); upload the image again.")
            explanation = predictor.explain(path, alpha=float(opacity))
        except ImageDecodeError as e:
            # The message starts with the temp file's name; the user knows their own file.
            raise gr.Error(str(e).split(": ", 1)[-1]) from None
        finally:
            uploads.release(path)
        p = explanation.probabilities[config.positive_label]
        decision = (f"### {explanation.prediction.capitalize()}\n"
                    f"P({config.positive_label}) = {p:.1%}; the model calls **{config.positive_label}** at "
                    f"{config.threshold:.1%} or above ({_threshold_words(config)}).")
        if explanation.warning:  # answered, but flagged where it cannot be missed
            decision = f"> **Unlike the training data:** {explanation.warning}.\n\n{decision}"
            gr.Warning(f"Unlike the training data: {explanation.warning}.")
        return explanation.probabilities, explanation.overlay, decision, (explanation.image, explanation.heatmap)

    def preview(upload):
        """Show the uploaded image as the model will see it (decoded, upright, grayscale)."""
        path = _upload_path(upload)
        if path is None or not Path(path).exists():
            return None
        try:
            return load_image(path)
        except ImageDecodeError as e:
            gr.Warning(str(e).split(": ", 1)[-1])
            return None

    def reblend(state, opacity: float):
        if state is None:
            return gr.skip()
        image, heatmap = state
        return blend(image, heatmap, float(opacity))

    return predict, preview, reblend


def example_files() -> list[list[str]]:
    if not EXAMPLES_DIR.is_dir():
        return []
    return [[str(p)] for p in sorted(EXAMPLES_DIR.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]


def build_demo(predictor: FracturePredictor) -> gr.Blocks:
    predict, preview, reblend = make_handlers(predictor)
    with gr.Blocks(title="bonefrac: fracture X-ray classifier", analytics_enabled=False, delete_cache=(600, 600)) as demo:
        gr.Markdown("# bonefrac\nUpload a radiograph to see how likely a fracture is and where the model looked.")
        gr.Markdown(DISCLAIMER)
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="X-ray image", file_types=[e for e in IMAGE_EXTENSIONS if e not in (".gif",)], type="filepath")
                opacity = gr.Slider(0.0, 1.0, value=0.4, step=0.05, label="Heat-map opacity")
                button = gr.Button("Analyse", variant="primary")
                shown = gr.Image(label="Input as the model reads it", format="png", type="pil", interactive=False)
            with gr.Column():
                label = gr.Label(num_top_classes=2, label="Probability")
                decision = gr.Markdown()
                overlay = gr.Image(label="Grad-CAM overlay", format="png", type="pil", interactive=False)
        examples = example_files()
        if examples:
            gr.Examples(examples=examples, inputs=[upload], label="Examples (from examples/)")
        # The decoded image and heat map stay in this session's memory (never on disk) for the slider.
        state = gr.State(None)
        button.click(predict, inputs=[upload, opacity], outputs=[label, overlay, decision, state], api_name="predict")
        upload.upload(preview, inputs=[upload], outputs=[shown], api_visibility="private")
        opacity.release(reblend, inputs=[state, opacity], outputs=[overlay], api_visibility="private")
    return demo


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (as MALLOC_ARENA_MAX would; an explicit MALLOC_ARENA_MAX wins).

    glibc gives each thread that allocates its own arena and keeps freed memory there; with Gradio's
    worker threads decoding X-rays, the server's RSS rose by 250-310 MB in the first ~150 requests
    of the load test and then stayed level (a plateau, not a leak); with two arenas, by 130-160 MB at
    the same latency (README, benchmarks/RESULTS.md). No effect, and False, where the C library is
    not glibc."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-8, arenas))  # -8: M_ARENA_MAX
    except (OSError, AttributeError):
        return False


def main() -> None:
    imported = time.perf_counter() - _STARTED
    limit_malloc_arenas()
    t = time.perf_counter()
    predictor = FracturePredictor.from_pretrained(os.environ.get("BONEFRAC_MODEL") or None)
    loaded = time.perf_counter() - t
    # Before the server listens: the first user gets the same latency as every later one.
    warmed = predictor.warm_up()
    t = time.perf_counter()
    demo = build_demo(predictor)
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=64)
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), max_file_size=MAX_FILE_SIZE, show_error=True,
                prevent_thread_lock=True)
    print(f"bonefrac: ready in {time.perf_counter() - _STARTED:.1f} s (imports {imported:.1f} s, model {loaded:.1f} s, "
          f"warm-up {warmed:.1f} s, server {time.perf_counter() - t:.1f} s); {predictor!r}", flush=True)
    demo.block_thread()


if __name__ == "__main__":
    main()
