"""`pie inferlet list | info | install | remove`: the programs `pie run` and `pie serve` can launch.

They are found where the server finds them (pie.runtime.programs): the standard library, the user's
folder `$PIE_HOME/inferlets`, then the config's `[runtime] inferlet_paths`. `install` copies a
package (a folder with Pie.toml and main.py, or one .py file) into the user's folder, with the
dependencies its pyproject.toml declares (pie.runtime.deps), `remove`
deletes it from there; the standard library is never written to.
"""

from __future__ import annotations

import difflib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from pie.cli.common import ConfigOption, command_group, fail
from pie.cli.params import describe
from pie.config import Config, load_config
from pie.errors import ProgramError
from pie.runtime import deps
from pie.runtime.programs import (
    MANIFEST_FILE,
    Program,
    ProgramRegistry,
    check_entry,
    operator_paths,
    stdlib_path,
)

app = command_group("List, inspect, install and remove inferlets (the programs `pie run` launches).")

NameArg = Annotated[str, typer.Argument(metavar="NAME[@VERSION]", help="An inferlet, e.g. text-completion.")]


def user_dir(settings: Config) -> Path:
    """Where `pie inferlet install` puts packages: `$PIE_HOME/inferlets` (the first of the operator's folders)."""
    return operator_paths(settings.pie_home)[0]


def registry(settings: Config) -> ProgramRegistry:
    """The registry the server of `settings` would build (same folders, same order)."""
    return ProgramRegistry(operator_paths(settings.pie_home, settings.runtime.inferlet_paths), standard=stdlib_path())


def resolve(settings: Config, spec: str) -> Program:
    """The program `pie run SPEC` would launch with this config; ProgramError lists what there is
    (and the closest name, for a typo)."""
    found = registry(settings)
    try:
        return found.resolve(spec)
    except ProgramError as error:
        names = sorted({info.name for info in found.programs()})
        close = difflib.get_close_matches(spec.partition("@")[0], names, n=1)
        if not close:
            raise
        raise ProgramError(f"{error} Did you mean {close[0]!r}?") from None


@app.command("list")
def list_(config: ConfigOption = None) -> None:
    """The standard and installed inferlets: name@version, where from, description."""
    settings = load_config(config)
    folders = [("standard", stdlib_path()), ("installed", user_dir(settings)),
               *(("config", Path(p).expanduser()) for p in settings.runtime.inferlet_paths)]
    rows: list[tuple[str, str, str]] = []
    for label, folder in folders:
        found = ProgramRegistry([folder])
        rows += [(info.name + "@" + info.version, label, info.description) for info in found.programs()]
        rows += [(Path(path).name, "broken", why) for path, why in found.broken.items()]
    if not rows:
        fail(f"no inferlets found in {', '.join(str(f) for _, f in folders)}")
    width = max(len(spec) for spec, _, _ in rows)
    for spec, label, description in sorted(rows, key=lambda r: r[0]):
        typer.echo(f"{spec:<{width}}  {label:<9}  {description}")


@app.command()
def info(name: NameArg, config: ConfigOption = None) -> None:
    """An inferlet's version, description, files and parameters (what `pie run NAME -- ...` accepts)."""
    program = resolve(load_config(config), name)
    manifest = program.manifest
    typer.echo(f"{manifest.spec}: {manifest.description or '(no description)'}")
    typer.echo(f"from: {program.origin}")
    if not manifest.parameters:
        typer.echo("parameters: none declared (any input is passed through)")
        return
    typer.echo("parameters (after `--`):")
    for param, spec in manifest.parameters.items():
        typer.echo(f"  {describe(param, spec if isinstance(spec, dict) else {})}")


@app.command()
def install(
    path: Annotated[Path, typer.Argument(help="A folder with Pie.toml and main.py, or one .py file.")],
    config: ConfigOption = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an installed inferlet of the same name.")] = False,
) -> None:
    """Copy an inferlet into $PIE_HOME/inferlets, after checking its Pie.toml and entry function."""
    settings = load_config(config)
    source = path.expanduser().resolve()
    if source.is_dir() and not (source / MANIFEST_FILE).is_file():
        fail(f"{source} holds no {MANIFEST_FILE}; an inferlet folder holds {MANIFEST_FILE} and main.py")
    if not (source.is_dir() or (source.is_file() and source.suffix == ".py")):
        fail(f"{source} is neither an inferlet folder nor a .py file")
    target_dir = user_dir(settings)
    target_dir.mkdir(parents=True, exist_ok=True)
    # Staged beside the target folder, checked there by the registry itself, then moved in one rename.
    with tempfile.TemporaryDirectory(prefix=".install-", dir=settings.pie_home) as staging:
        staged = _copy(source, Path(staging))
        program = _only_program(Path(staging), source)
        check_entry(program)
        if staged.is_dir():  # its pyproject.toml's dependencies, into the package's own .deps folder
            installed = deps.install(staged)
            if installed:
                typer.echo(f"installed its dependencies: {', '.join(installed)}")
        target = target_dir / (program.manifest.name if source.is_dir() else staged.name)
        if target.exists() and not force:
            fail(f"{target} exists; pass --force to replace it, or `pie inferlet remove {program.manifest.name}`")
        _delete(target)
        os.replace(staged, target)
    typer.echo(f"installed {program.spec} into {target}")


@app.command()
def remove(name: NameArg, config: ConfigOption = None) -> None:
    """Delete an installed inferlet from $PIE_HOME/inferlets (standard ones cannot be removed)."""
    settings = load_config(config)
    try:
        program = ProgramRegistry([user_dir(settings)]).resolve(name)
    except ProgramError:
        where = "a standard inferlet" if ProgramRegistry([stdlib_path()]).has(name) else "not installed"
        fail(f"{name} is {where}; only inferlets in {user_dir(settings)} can be removed "
             "(`pie inferlet list` shows where each comes from)")
    assert program.root is not None, "a scanned program is a folder or a file"
    _delete(program.root)
    typer.echo(f"removed {program.spec} ({program.root})")


def _copy(source: Path, staging: Path) -> Path:
    if source.is_file():
        return Path(shutil.copy2(source, staging / source.name))
    target = staging / source.name
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", ".git", ".deps"))
    return target


def _only_program(staging: Path, source: Path) -> Program:
    found = ProgramRegistry([staging])
    if found.broken:
        raise ProgramError("; ".join(found.broken.values()))
    programs = [found.resolve(f"{info.name}@{info.version}") for info in found.programs()]
    if len(programs) != 1:
        raise ProgramError(f"{source} is not one inferlet package (found {len(programs)})")
    return programs[0]


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
