"""Resolve a model name (built-in id, local directory, or Hugging Face repo id) to a local directory.

Torch-free: the runtime uses this to find tokenizer files, the engine to find
weights. Repo ids go through huggingface_hub's own cache and environment
variables (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN).
"""

from __future__ import annotations

import os
from pathlib import Path

from pie.errors import ModelNotFoundError
from pie.tiny_model import TINY_MODEL_ID, ensure_tiny_model

# Files a checkpoint needs; weights are fetched by pattern so unrelated files (onnx, gguf) are skipped.
_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"]


def resolve_model_dir(model: str, *, revision: str | None = None, download: bool = True) -> Path:
    """Return a directory holding config.json (+ weights and tokenizer) for `model`."""
    if model == TINY_MODEL_ID:
        return ensure_tiny_model()
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(
                f"{path} is a directory but holds no config.json; point the model at a Hugging Face "
                "checkpoint directory (config.json, *.safetensors, tokenizer.json)."
            )
        return path.resolve()
    if model.startswith(("/", ".", "~")) or model.count("/") != 1:
        raise ModelNotFoundError(
            f"model {model!r} is neither an existing directory nor a Hugging Face repo id (owner/name)."
        )
    return _resolve_repo(model, revision=revision, download=download)


def _resolve_repo(repo_id: str, *, revision: str | None, download: bool) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=_ALLOW_PATTERNS, local_files_only=True)
        )
    except Exception as cached_miss:  # huggingface_hub raises several types for "not in cache"
        reason: Exception = cached_miss
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if download and not offline:
        try:
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_ALLOW_PATTERNS))
        except Exception as fetch_error:
            reason = fetch_error
    raise ModelNotFoundError(
        f"model {repo_id!r} is not in the Hugging Face cache and could not be downloaded "
        f"({type(reason).__name__}: {str(reason).splitlines()[0] if str(reason) else ''}). "
        f"Fetch it with `pie model download {repo_id}` (or `huggingface-cli download {repo_id}`) on a "
        "machine with network access, or set the model to a local directory holding config.json and "
        "*.safetensors."
    ) from reason
