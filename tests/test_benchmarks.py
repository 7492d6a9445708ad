"""Benchmarks are not timed tests: CI only smoke-runs them with tiny sizes and checks the table they write."""
from benchmarks.inference import main as inference_main


def test_inference_benchmark_smoke(real_data, tiny_model_dir, tmp_path):
    results = tmp_path / "RESULTS.md"
    assert inference_main(["--model", str(tiny_model_dir), "--files", "4", "--repeat", "5", "--batch-size", "2", "--results", str(results)]) == 0
    text = results.read_text()
    assert "## Inference (CPU)" in text and "python -m benchmarks.inference --model" in text and "cores, torch" in text
    rows = [line for line in text.splitlines() if line.startswith("| predict") or line.startswith("| explain")]
    assert len(rows) == 3 and all(line.count("|") == 7 for line in rows)


def test_training_benchmark_smoke(real_data, tmp_path):
    from benchmarks.training import main as training_main

    results = tmp_path / "RESULTS.md"
    assert training_main(["--size", "32", "--images", "8", "--batch-size", "4", "--steps", "2", "--cache-dir", str(tmp_path / "cache"),
                          "--results", str(results)]) == 0
    assert "## Training throughput" in results.read_text() and "synthetic-data ceiling" in results.read_text()


def test_startup_benchmark_smoke(real_data, tmp_path):
    """The real app prints its start-up phases, and the benchmark reads them and times a first request."""
    from benchmarks.startup import main as startup_main

    results = tmp_path / "RESULTS.md"
    assert startup_main(["--runs", "1", "--results", str(results)]) == 0
    text = results.read_text()
    assert "## App start-up (CPU)" in text and "spawn -> first answered request" in text
    assert "warm-up (grad-cam import" in text and "`import pytorch_grad_cam`" in text
