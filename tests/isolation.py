"""Keeping the tests off the user's real home: every test gets its own HOME, PIE_HOME and Hugging Face
cache under a temp dir, and the run checks at the end that the real ~/.pie and ~/.cache/huggingface
are as it found them.

`ORIGINAL_ENV` is the environment as pytest started; tests/conftest.py imports this module before
it patches anything, so the real folders are known even after the patch. `watched_dirs` derives the
real folders the way pie and huggingface_hub do (PIE_HOME, else ~/.pie; HF_HUB_CACHE / HF_HOME /
XDG_CACHE_HOME, else ~/.cache/huggingface).
"""

from __future__ import annotations

import os
from pathlib import Path

ORIGINAL_ENV = dict(os.environ)
# Variables that would point huggingface_hub or transformers back at a real cache over HF_HOME.
HF_OVERRIDES = ("HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_ASSETS_CACHE", "HF_XET_CACHE", "HF_TOKEN_PATH",
                "HF_DATASETS_CACHE")

Entry = tuple[int, int, int]  # (mode, size, mtime_ns) of one path, as lstat sees it
Snapshot = dict[str, dict[str, Entry]]  # watched folder -> relative path -> entry; {} when it does not exist


def real_home() -> Path:
    return Path(ORIGINAL_ENV.get("HOME") or os.path.expanduser("~"))


def watched_dirs() -> list[Path]:
    """The real folders no test may write: pie's home and the Hugging Face cache, by default and as
    the environment pytest started in names them."""
    home, env = real_home(), ORIGINAL_ENV
    cache = Path(env.get("XDG_CACHE_HOME") or home / ".cache")
    dirs = [home / ".pie", cache / "huggingface", home / ".cache" / "huggingface"]
    dirs += [Path(env[k]) for k in ("PIE_HOME", "HF_HOME", "HF_HUB_CACHE", *HF_OVERRIDES) if env.get(k)]
    return sorted({d.expanduser().absolute() for d in dirs})


def homes_env(base: Path) -> dict[str, str]:
    """The variables that put a test's homes under `base` (HOME itself: pie derives ~/.pie and
    ~/.ssh from it, huggingface_hub ~/.cache)."""
    home = base / "home"
    home.mkdir(parents=True, exist_ok=True)
    cache = home / ".cache"
    return {"HOME": str(home), "PIE_HOME": str(home / ".pie"), "XDG_CACHE_HOME": str(cache),
            "XDG_CONFIG_HOME": str(home / ".config"), "XDG_DATA_HOME": str(home / ".local" / "share"),
            "XDG_STATE_HOME": str(home / ".local" / "state"), "HF_HOME": str(cache / "huggingface"),
            "HF_HUB_CACHE": str(cache / "huggingface" / "hub")}


def snapshot_dir(root: Path) -> dict[str, Entry]:
    """Every path under `root` (root included, links not followed) with its mode, size and mtime."""
    if not os.path.lexists(root):
        return {}
    found: dict[str, Entry] = {}
    for path in [root, *root.rglob("*")]:
        try:
            info = path.lstat()
        except FileNotFoundError:  # removed while we walked: the next snapshot shows it gone
            continue
        found[str(path.relative_to(root))] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return found


def snapshot(dirs: list[Path]) -> Snapshot:
    return {str(d): snapshot_dir(d) for d in dirs}


def changes(before: Snapshot, after: Snapshot) -> list[str]:
    """What differs, one line a path: `added`, `removed` or `changed` and where."""
    lines = []
    for root in sorted(before.keys() | after.keys()):
        old, new = before.get(root, {}), after.get(root, {})
        for rel in sorted(old.keys() | new.keys()):
            where = os.path.normpath(os.path.join(root, rel))
            if rel not in old:
                lines.append(f"added {where}")
            elif rel not in new:
                lines.append(f"removed {where}")
            elif old[rel] != new[rel]:
                lines.append(f"changed {where}")
    return lines
