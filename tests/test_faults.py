"""Faults lose nothing: a training run killed with SIGKILL resumes from its last complete checkpoint."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT
from training.train import get_args_parser, main as train_main


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(real_data, tmp_path):
    run = tmp_path / "run"
    common = ["--data", str(real_data / "fracatlas"), "--output-dir", str(run), "--limit", "40", "--size", "32",
              "--batch-size", "4", "--workers", "1", "--no-progress", "--cache-dir", str(tmp_path / "cache"), "--preview", "0",
              "--val-fraction", "0.25", "--test-fraction", "0.25", "--patience", "0", "--bootstrap", "50"]
    proc = subprocess.Popen([sys.executable, "-m", "training.train", *common, "--epochs", "500"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 120
        ckpt = run / "checkpoint.pt"
        while time.time() < deadline and not (ckpt.exists() and torch.load(ckpt, weights_only=True)["epoch"] >= 2):
            time.sleep(0.2)
        assert ckpt.exists(), "no checkpoint within 120 s"
        time.sleep(0.3)  # somewhere inside the next epoch (or its checkpoint write)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(run / "checkpoint.pt", weights_only=True)  # complete and loadable, whatever the moment of the kill
    done = state["epoch"]
    assert done >= 2 and [h["epoch"] for h in state["history"]] == list(range(1, done + 1))
    assert not (run / "metrics.json").exists()  # the run never got to finish

    args = get_args_parser().parse_args([*common, "--epochs", str(done + 1), "--resume"])
    metrics = train_main(args)
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, done + 2))
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == done + 1
    assert (run / "best.safetensors").exists() and (run / "metrics.json").exists()
