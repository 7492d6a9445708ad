"""Loading by Hub repo id from a real huggingface_hub cache built on disk, offline (nothing pretends to be the Hub)."""
import hashlib
import os
import shutil

import pytest
import torch

from bonefrac import FracturePredictor
from bonefrac.hub import ModelSourceError, split_revision

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_cache(cache, repo_id: str, folder, commit: str = COMMIT, files=("config.json", "model.safetensors"), ref="main"):
    """Lay files out exactly as huggingface_hub's cache does: blobs by hash, snapshot symlinks, refs."""
    from huggingface_hub.file_download import repo_folder_name

    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    for name in files:
        data = (folder / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return repo


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _logits(predictor):
    torch.manual_seed(0)
    return predictor.model(torch.randn(1, 3, predictor.config.input_size, predictor.config.input_size))


def test_load_by_repo_id_and_revision_offline(hf_cache, tiny_model_dir, monkeypatch):
    populate_cache(hf_cache, "someone/bonefrac-tiny", tiny_model_dir)
    direct = FracturePredictor.from_pretrained(tiny_model_dir, device="cpu")
    pinned = FracturePredictor.from_pretrained("someone/bonefrac-tiny", revision=COMMIT, device="cpu")
    at = FracturePredictor.from_pretrained(f"someone/bonefrac-tiny@{COMMIT}", device="cpu")
    main = FracturePredictor.from_pretrained("someone/bonefrac-tiny", device="cpu")
    with torch.inference_mode():
        for p in (pinned, at, main):
            assert torch.equal(_logits(p), _logits(direct))
    monkeypatch.setenv("BONEFRAC_MODEL", f"someone/bonefrac-tiny@{COMMIT}")
    assert FracturePredictor.from_pretrained(device="cpu").config == direct.config


def test_not_cached_offline_is_a_clear_error(hf_cache):
    with pytest.raises(ModelSourceError, match="cannot reach the Hub and someone/absent@v1 .* not in the local cache"):
        FracturePredictor.from_pretrained("someone/absent", revision="v1")


def test_repo_without_safetensors(hf_cache, tiny_model_dir, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_model_dir / "config.json", pickled / "config.json")
    populate_cache(hf_cache, "someone/pickled", pickled, files=("config.json",))
    with pytest.raises(ModelSourceError, match="model.safetensors"):
        FracturePredictor.from_pretrained("someone/pickled", revision=COMMIT)


def test_split_revision(tmp_path):
    assert split_revision("user/repo@abc") == ("user/repo", "abc")
    assert split_revision("user/repo") == ("user/repo", None)
    odd = tmp_path / "with@sign"
    odd.mkdir()
    assert split_revision(str(odd)) == (str(odd), None)
