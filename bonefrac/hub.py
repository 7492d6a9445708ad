"""Resolve a model source to a local folder holding config.json + model.safetensors.

Sources: None (the bundled ``model/`` folder, or ``$BONEFRAC_MODEL``), a local folder, or a
Hugging Face Hub repo id ``user/repo`` with an optional ``@revision``.
"""
from __future__ import annotations

import os
from pathlib import Path

from .config import CONFIG_NAME, WEIGHTS_NAME

BUNDLED_MODEL_DIR = Path(__file__).resolve().parent.parent / "model"
ENV_VAR = "BONEFRAC_MODEL"


class ModelSourceError(ValueError):
    """A model source that cannot be found or fetched."""


def split_revision(source: str) -> tuple[str, str | None]:
    """``"user/repo@abc123"`` -> ``("user/repo", "abc123")``."""
    if "@" in source and not Path(source).exists():
        repo, _, rev = source.rpartition("@")
        return repo, rev or None
    return source, None


def resolve_model_dir(source: str | os.PathLike | None = None, revision: str | None = None) -> Path:
    if source is None:
        source = os.environ.get(ENV_VAR) or BUNDLED_MODEL_DIR
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelSourceError(f"model source {path} is a file; pass the model folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}")
        if not (path / CONFIG_NAME).is_file():
            raise ModelSourceError(f"model folder {path} has no {CONFIG_NAME}")
        return path
    text = str(source)
    repo_id, rev = split_revision(text)
    revision = revision or rev
    if _looks_like_repo_id(repo_id):
        return _download_from_hub(repo_id, revision)
    if path == BUNDLED_MODEL_DIR:
        raise ModelSourceError(f"the bundled model folder {path} is missing; reinstall bonefrac or pass --model")
    raise ModelSourceError(f"model source {text!r} is neither an existing folder nor a Hub repo id like 'user/repo[@revision]'")


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and "\\" not in text


def _download_from_hub(repo_id: str, revision: str | None) -> Path:
    """Fetch only config.json and model.safetensors (never pickles) into the standard HF cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}" if revision else repo_id
    paths = {}
    for filename in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            paths[filename] = Path(hf_hub_download(repo_id, filename, revision=revision))
        except RepositoryNotFoundError:
            raise ModelSourceError(f"Hub repo {repo_id!r} not found (or private: set HF_TOKEN)") from None
        except RevisionNotFoundError:
            raise ModelSourceError(f"revision {revision!r} not found in Hub repo {repo_id!r}") from None
        # LocalEntryNotFoundError subclasses EntryNotFoundError in recent huggingface_hub: catch it first.
        except LocalEntryNotFoundError:
            raise ModelSourceError(f"cannot reach the Hub and {where} ({filename}) is not in the local cache") from None
        except EntryNotFoundError:
            raise ModelSourceError(f"Hub repo {where} has no {filename}; bonefrac loads only {CONFIG_NAME} + {WEIGHTS_NAME}") from None
    folder = paths[CONFIG_NAME].parent
    if paths[WEIGHTS_NAME].parent != folder:
        raise ModelSourceError(f"{where}: config and weights resolved to different snapshots")
    return folder
