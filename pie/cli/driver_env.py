"""The dev driver's Python environment: which interpreter runs pie's engine, and how to build one.

The choice is kept in `$PIE_HOME/driver.toml` (`[dev] venv = ...` or `[dev] python = ...`). An
interpreter is looked for in this order (seed 002): the model's own `venv` / `python` options, the
`pie driver dev set ...` choice, `$PIE_PYTHON`, the active virtualenv (`$VIRTUAL_ENV`), `python3` on PATH.
"""

from __future__ import annotations

import os
import shutil
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from pie.config import ModelOptions, pie_home
from pie.config_io import atomic_write
from pie.errors import ConfigError, FlavorError

DRIVER_FILE = "driver.toml"
KINDS = ("venv", "python")


@dataclass(frozen=True)
class Interpreter:
    python: Path
    source: str  # where the choice came from, for `pie driver dev show`


def driver_file(home: Path | None = None) -> Path:
    return (home or pie_home()) / DRIVER_FILE


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def read_choice(home: Path | None = None) -> tuple[str, Path] | None:
    """("venv" | "python", path) as `pie driver dev set` stored it, or None."""
    path = driver_file(home)
    if not path.exists():
        return None
    try:
        dev = tomllib.loads(path.read_text()).get("dev", {})
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error}); fix it or run `pie driver dev set venv PATH` "
                          "after deleting it") from None
    unknown = set(dev) - set(KINDS)
    if unknown or len(dev) > 1 or not all(isinstance(v, str) for v in dev.values()):
        raise ConfigError(f"{path}: [dev] holds one of venv = \"...\" or python = \"...\", found {dev}; "
                          "rewrite it with `pie driver dev set venv PATH`")
    return next(((kind, Path(value)) for kind, value in dev.items()), None)


def store_choice(kind: str, target: Path, home: Path | None = None) -> Path:
    """Remember the dev driver's venv or python (checked to exist); returns the interpreter."""
    assert kind in KINDS, kind
    target = Path(os.path.abspath(target.expanduser()))  # not resolve(): a venv's python is a symlink
    python = venv_python(target) if kind == "venv" else target
    if not (python.is_file() and os.access(python, os.X_OK)):
        fix = (f"create it with `pie driver dev install {target} --run`" if kind == "venv"
               else "give the path of a python executable")
        raise ConfigError(f"no python interpreter at {python}; {fix}")
    atomic_write(driver_file(home), tomli_w.dumps({"dev": {kind: str(target)}}))
    return python


def resolve_python(options: ModelOptions | None = None, home: Path | None = None) -> Interpreter:
    if options is not None and options.venv:
        return Interpreter(venv_python(Path(options.venv).expanduser()), "the model's `venv` option")
    if options is not None and options.python:
        return Interpreter(Path(options.python).expanduser(), "the model's `python` option")
    choice = read_choice(home)
    if choice is not None:
        kind, path = choice
        python = venv_python(path) if kind == "venv" else path
        return Interpreter(python, f"`pie driver dev set {kind}` ({driver_file(home)})")
    if os.environ.get("PIE_PYTHON"):
        return Interpreter(Path(os.environ["PIE_PYTHON"]), "$PIE_PYTHON")
    if os.environ.get("VIRTUAL_ENV"):
        return Interpreter(venv_python(Path(os.environ["VIRTUAL_ENV"])), "the active virtualenv ($VIRTUAL_ENV)")
    found = shutil.which("python3")
    return Interpreter(Path(found) if found else Path(sys.executable), "python3 on PATH" if found
                       else "this pie's own interpreter (no python3 on PATH)")


def install_plan(venv: Path, home: Path | None = None) -> tuple[list[list[str]], str]:
    """The commands that create `venv` with torch and pie's engine, and a note on the torch build chosen."""
    python = str(venv_python(venv))
    torch_cmd = [python, "-m", "pip", "install", "torch"]
    flavor_note = "no flavor recorded and none detected: torch from PyPI's default index"
    cuda_extra = False
    try:
        from pie.flavors import detect_flavor, installed_flavor, read_driver_version

        flavor = installed_flavor(home or pie_home()) or detect_flavor(read_driver_version())
        torch_cmd += ["--index-url", flavor.torch_index_url]
        cuda_extra = flavor.has_flashinfer
        flavor_note = f"flavor {flavor.name}: torch {flavor.torch_build} from {flavor.torch_index_url}"
    except FlavorError as error:
        flavor_note = f"{flavor_note} ({error})"
    pie_cmd = [python, "-m", "pip", "install", _pie_requirement(cuda_extra)]
    return [[sys.executable, "-m", "venv", str(venv)], torch_cmd, pie_cmd], flavor_note


def _pie_requirement(cuda: bool) -> str:
    """This checkout when pie runs from source, else the same released version."""
    import pie

    extra = "[cuda]" if cuda else ""
    source = Path(pie.__file__).resolve().parent.parent
    if (source / "pyproject.toml").is_file():
        return f"{source}{extra}"
    return f"pie{extra}=={pie.__version__}"


PROBE = """
import json, importlib.util, sys
out = {"python": sys.version.split()[0], "executable": sys.executable}
try:
    import torch
    out["torch"] = torch.__version__
    out["cuda"] = torch.cuda.is_available()
    out["cuda_devices"] = torch.cuda.device_count() if out["cuda"] else 0
    out["torch_cuda"] = torch.version.cuda
except Exception as error:
    out["torch_error"] = f"{type(error).__name__}: {error}"
out["flashinfer"] = importlib.util.find_spec("flashinfer") is not None
try:
    import pie.engine.engine
    out["pie"] = True
except Exception as error:
    out["pie_error"] = f"{type(error).__name__}: {error}"
print(json.dumps(out))
"""
