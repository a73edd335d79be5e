"""An inferlet package's Python dependencies: installed with the package, never at launch.

A package folder may hold a `pyproject.toml` whose `[project] dependencies` it needs
(`dependencies = ["pyyaml>=6"]`). `pie inferlet install` installs them with pip into the
package's own folder (`<package>/.deps`), so packages never see each other's versions through
the install, and records what it installed (`.deps/pie-deps.json`). A launch only checks that
record: a package whose declared dependencies are not installed (copied in by hand, or its
`pyproject.toml` edited since) is refused with the command that installs them.

Where from: pip's own configuration on this machine (`pip config`, `PIP_INDEX_URL`,
`PIP_FIND_LINKS`, ...), i.e. the index the operator configured, and nothing a package names
itself: a requirement with a direct reference (`name @ https://...`, a path, a VCS URL) is
refused. Requirements are parsed by `packaging`, as pip does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

from pie.errors import ProgramError

PYPROJECT = "pyproject.toml"
DEPS_DIR = ".deps"
RECORD = "pie-deps.json"
PIP_TIMEOUT_S = 600.0


def declared(root: Path) -> list[str]:
    """The `[project] dependencies` of the package folder `root` ([] without a pyproject.toml)."""
    path = root / PYPROJECT
    if not root.is_dir() or not path.is_file():
        return []
    try:
        project = tomllib.loads(path.read_text()).get("project") or {}
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ProgramError(f"{path}: not valid TOML ({error})") from None
    deps = project.get("dependencies") or []
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        raise ProgramError(f"{path}: [project] dependencies must be a list of requirement strings")
    for text in deps:
        try:
            requirement = Requirement(text)
        except InvalidRequirement as error:
            raise ProgramError(f"{path}: dependency {text!r} is not a valid requirement ({error})") from None
        if requirement.url:
            raise ProgramError(f"{path}: dependency {text!r} names its own source ({requirement.url}); "
                               "dependencies come from the configured package index only: give a name "
                               "and version range")
    return list(deps)


def install(root: Path) -> list[str]:
    """Install `root`'s declared dependencies into `root/.deps`; what was installed. Raises
    ProgramError with pip's own words when pip cannot."""
    deps = declared(root)
    if not deps:
        return []
    target = root / DEPS_DIR
    command = [sys.executable, "-m", "pip", "install", "--no-input", "--disable-pip-version-check",
               "--target", str(target), *deps]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise ProgramError(f"installing {', '.join(deps)} took over {PIP_TIMEOUT_S:.0f} s; check the "
                           "package index pip is configured with (pip config list)") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-6:]
        raise ProgramError(f"pip could not install {', '.join(deps)} from the configured index "
                           f"(pip config list shows it):\n  " + "\n  ".join(tail))
    (target / RECORD).write_text(json.dumps({"dependencies": deps}))
    return deps


def import_path(root: Path | None, spec: str) -> str | None:
    """Where the package's dependencies are importable from (None: it declares none); ProgramError
    when they are declared but not installed as declared."""
    if root is None:
        return None
    deps = declared(root)
    if not deps:
        return None
    record = root / DEPS_DIR / RECORD
    try:
        installed = json.loads(record.read_text()).get("dependencies")
    except (OSError, ValueError):
        installed = None
    if installed != deps:
        raise ProgramError(f"{spec} declares dependencies ({', '.join(deps)}) that are not installed "
                           f"{'as declared ' if installed is not None else ''}in {root / DEPS_DIR}; install the "
                           "package with `pie inferlet install PATH` (pie never installs them at launch)")
    return str(root / DEPS_DIR)
