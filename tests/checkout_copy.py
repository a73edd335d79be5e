"""A clean copy of this checkout to build a wheel from: building in the live checkout would leave
build/ and pie.egg-info/ in it (and an egg-info on PYTHONPATH makes pip think pie is installed)."""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def clean_copy(dest: Path) -> Path:
    """The checkout's sources copied to `dest` (no dot folders, caches or earlier build output)."""
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
        ".*", "__pycache__", "build", "dist", "*.egg-info", "result"))
    return dest
