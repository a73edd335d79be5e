"""Resolve a model name (built-in id, local directory, or Hugging Face repo id) to a local directory.

Torch-free: the runtime uses this to find tokenizer files, the engine to find
weights. Repo ids go through huggingface_hub's own cache and environment
variables (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_ENDPOINT, HF_TOKEN). Before a download the hub
is probed with a 2 s TCP connect, so an offline machine is told so at once (huggingface_hub's own
timeouts and retries took 11 s) together with the ways to run without network.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

from pie.errors import ModelNotFoundError
from pie.tiny_model import TINY_MODEL_ID, ensure_tiny_model

# Files a checkpoint needs; weights are fetched by pattern so unrelated files (onnx, gguf) are skipped.
_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"]
DEFAULT_ENDPOINT = "https://huggingface.co"
HUB_TIMEOUT_S = 2.0  # a hub that does not accept a connection in 2 s is treated as unreachable


def resolve_model_dir(model: str, *, revision: str | None = None, download: bool = True,
                      suggest_download: bool = True) -> Path:
    """Return a directory holding config.json (+ weights and tokenizer) for `model`. When a repo id is
    neither cached nor downloadable, the error says how to go on offline (and, unless
    `suggest_download` is off, that `pie model download` fetches it: not when that is the caller)."""
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
    return _resolve_repo(model, revision=revision, download=download, suggest_download=suggest_download)


def check_obtainable(model: str, *, revision: str | None = None) -> None:
    """Raise ModelNotFoundError now, in about HUB_TIMEOUT_S at most, when `model` is neither built in,
    a folder, nor cached and the hub cannot be reached: what `pie run` and `pie serve` check before
    anything loads. A model the hub can still deliver passes (the engine downloads it)."""
    if model == TINY_MODEL_ID or Path(model).expanduser().is_dir():
        return
    try:
        resolve_model_dir(model, revision=revision, download=False)
        return
    except ModelNotFoundError as missing:
        if model.startswith(("/", ".", "~")) or model.count("/") != 1:
            raise missing from None
    why = "HF_HUB_OFFLINE is set" if hub_offline() else hub_unreachable()
    if why is not None:
        raise ModelNotFoundError(unavailable_message(model, why))


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_endpoint() -> str:
    """The hub huggingface_hub talks to: $HF_ENDPOINT (a mirror), else huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or DEFAULT_ENDPOINT


def hub_unreachable(timeout_s: float = HUB_TIMEOUT_S) -> str | None:
    """None when a TCP connection to the hub (or to the HTTPS proxy in the environment) opens within
    `timeout_s`, else why not. Name lookup has no timeout of its own, so the probe runs on a thread."""
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(k)), "")
    url = urlsplit(proxy or hub_endpoint())
    host, port = url.hostname or "", url.port or (443 if url.scheme in ("https", "") else 80)
    where = f"{'proxy ' if proxy else ''}{host}:{port}"
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(f"cannot reach {where} ({error.strerror or type(error).__name__})")

    thread = threading.Thread(target=probe, name="pie-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return outcome[0] if outcome else f"no answer from {where} within {timeout_s:g} s"


def unavailable_message(repo_id: str, why: str, *, suggest_download: bool = True) -> str:
    """What to do when `repo_id` is not cached and cannot be fetched: the offline ways out first."""
    from huggingface_hub import constants

    fetch = (f" With network, `pie model download {repo_id}` fetches it into the cache."
             if suggest_download else "")
    return (f"model {repo_id!r} is not in the Hugging Face cache and could not be downloaded ({why}; cache: "
            f"{constants.HF_HUB_CACHE}). Without network: use the built-in model (`pie run text-completion --model "
            f"{TINY_MODEL_ID} -- --prompt Hello`, or hf_repo = \"{TINY_MODEL_ID}\" in the config); or name a "
            "local checkpoint folder holding config.json and *.safetensors (`--model /path/to/folder`); or "
            f"copy a cache made on a machine with network (`hf download {repo_id}` there), point HF_HOME at it "
            "and set HF_HUB_OFFLINE=1. HF_ENDPOINT names a hub mirror." + fetch)


def _resolve_repo(repo_id: str, *, revision: str | None, download: bool, suggest_download: bool) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=_ALLOW_PATTERNS, local_files_only=True)
        )
    except Exception as cached_miss:  # huggingface_hub raises several types for "not in cache"
        reason: Exception = cached_miss
    why = "HF_HUB_OFFLINE is set" if hub_offline() else None
    if download and why is None:
        why = hub_unreachable()  # fail in seconds, not after huggingface_hub's retries
        if why is None:
            try:
                return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_ALLOW_PATTERNS))
            except Exception as fetch_error:
                reason = fetch_error
                why = f"{type(fetch_error).__name__}: {str(fetch_error).splitlines()[0] if str(fetch_error) else ''}"
    if not download and why is None:
        why = "this lookup only reads the cache"
    raise ModelNotFoundError(unavailable_message(repo_id, why or "", suggest_download=suggest_download)) from reason
