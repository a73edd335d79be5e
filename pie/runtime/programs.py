"""Inferlet packages and the registry that resolves `name` / `name@version` to one.

A package is a folder with `Pie.toml` and `main.py`:

    [package]
    name = "text-completion"        # required
    version = "0.1.0"               # required (semver)
    description = "..."
    [parameters]                    # checked by `pie run` before it starts (pie.cli.params), not by the server
    prompt = { type = "string", description = "..." }
    [runtime]                       # optional; pie-client's @inferlet writes these
    entry = "main"                  # the function to call (default `main`)
    call = "input"                  # "input": entry(input_dict); "kwargs": entry(**input_dict)

A single `foo_bar.py` file is a package too: name `foo-bar`, version 0.0.0,
description from its docstring.

Where programs come from, later sources winning for the same name@version:
the standard library (`inferlets/` beside the `pie` package, also in the
wheel), the user's folder (`$PIE_HOME/inferlets`, default `~/.pie/inferlets`),
configured extra folders, and uploads (`add`: the files and manifest text a
client sends). A bare name resolves to the highest version.
"""

from __future__ import annotations

import ast
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from packaging.version import InvalidVersion, Version

from pie.errors import ProgramError
from pie.runtime.api import ProgramInfo

ENTRY_FILE = "main.py"
MANIFEST_FILE = "Pie.toml"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SKIP_PARTS = {"__pycache__", ".git"}


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    description: str = ""
    parameters: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    entry: str = "main"
    call: Literal["input", "kwargs"] = "input"

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def parse(cls, text: str, where: str) -> Manifest:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ProgramError(f"{where}: Pie.toml is not valid TOML: {e}") from None
        package = data.get("package")
        if not isinstance(package, dict):
            raise ProgramError(f"{where}: Pie.toml needs a [package] table with `name` and `version`")
        name, version = package.get("name"), package.get("version")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ProgramError(f"{where}: [package] name {name!r} must be letters, digits, '.', '_' or '-'")
        if not isinstance(version, str) or not version:
            raise ProgramError(f"{where}: [package] version must be a string such as \"0.1.0\", got {version!r}")
        runtime = _table(data, "runtime")
        entry, call = runtime.get("entry", "main"), runtime.get("call", "input")
        if not isinstance(entry, str) or not entry.isidentifier():
            raise ProgramError(f"{where}: [runtime] entry {entry!r} must be a Python function name")
        if call not in ("input", "kwargs"):
            raise ProgramError(f"{where}: [runtime] call must be \"input\" or \"kwargs\", got {call!r}")
        parameters = _table(data, "parameters")
        return cls(name=name, version=version, description=str(package.get("description") or ""),
                   parameters=MappingProxyType(dict(parameters)), entry=entry, call=call)


@dataclass(frozen=True)
class Program:
    """A resolved package: its manifest plus where its files are (a folder, a file, or uploaded bytes)."""

    manifest: Manifest
    origin: str  # for messages: a path, or "uploaded"
    root: Path | None = None
    uploaded: Mapping[str, bytes] | None = None

    @property
    def spec(self) -> str:
        return self.manifest.spec

    def info(self) -> ProgramInfo:
        m = self.manifest
        return ProgramInfo(name=m.name, version=m.version, description=m.description,
                           parameters={k: dict(v) for k, v in m.parameters.items()})

    def files(self) -> dict[str, bytes]:
        """relative path -> content. Folders are read now, so an edit shows in the next launch."""
        if self.uploaded is not None:
            return dict(self.uploaded)
        assert self.root is not None, "a program is a folder, a file or an upload"
        if self.root.is_file():
            return {ENTRY_FILE: self.root.read_bytes()}
        return {p.relative_to(self.root).as_posix(): p.read_bytes() for p in sorted(self.root.rglob("*"))
                if p.is_file() and not _SKIP_PARTS.intersection(p.parts)}

    def source(self) -> str:
        files = self.files()
        if ENTRY_FILE not in files:
            raise ProgramError(f"{self.spec} ({self.origin}) has no {ENTRY_FILE}")
        return files[ENTRY_FILE].decode("utf-8")


def default_search_paths(pie_home: Path | None = None, extra: Iterable[Path] = ()) -> list[Path]:
    """The standard library, then `$PIE_HOME/inferlets` (default ~/.pie/inferlets), then `extra`."""
    home = pie_home or Path(os.environ.get("PIE_HOME", Path.home() / ".pie"))
    return [stdlib_path(), home / "inferlets", *extra]


def stdlib_path() -> Path:
    """`inferlets/` beside the `pie` package: the repository root in a checkout, site-packages in a wheel."""
    import pie

    return Path(pie.__file__).resolve().parent.parent / "inferlets"


class ProgramRegistry:
    def __init__(self, search_paths: Iterable[Path]) -> None:
        self.search_paths = [Path(p).expanduser() for p in search_paths]
        self._uploaded: dict[tuple[str, str], Program] = {}
        self._found: dict[tuple[str, str], Program] = {}
        self.broken: dict[str, str] = {}  # folder -> why it is not a package (shown when a lookup fails)
        self.refresh()

    def refresh(self) -> None:
        """Rescan the folders (done again automatically when a name is not found)."""
        found: dict[tuple[str, str], Program] = {}
        broken: dict[str, str] = {}
        for folder in self.search_paths:
            for item in _scan(folder):
                if isinstance(item, ProgramError):
                    broken[str(item.args[1])] = str(item.args[0])
                else:
                    found[(item.manifest.name, item.manifest.version)] = item
        self._found, self.broken = found, broken

    def programs(self) -> list[ProgramInfo]:
        return [p.info() for p in self._all().values()]

    def has(self, spec: str) -> bool:
        try:
            self.resolve(spec)
        except ProgramError:
            return False
        return True

    def resolve(self, spec: str) -> Program:
        """`name@version`, or `name` for its highest version."""
        program = self._lookup(spec)
        if program is None:
            self.refresh()
            program = self._lookup(spec)
        if program is None:
            names = sorted(f"{n}@{v}" for n, v in self._all())
            skipped = "".join(f"; skipped {path}: {why}" for path, why in self.broken.items())
            raise ProgramError(f"no inferlet {spec!r}; available: {', '.join(names) or 'none'}{skipped}. "
                               f"Install it into {self.search_paths[min(1, len(self.search_paths) - 1)]} "
                               "or upload it")
        return program

    def add(self, name: str, version: str, files: Mapping[str, bytes], manifest: str, *,
            force: bool = False) -> ProgramInfo:
        """Register an uploaded program. The same name@version again is refused unless `force` (or
        unless it is byte-identical, which makes retries harmless)."""
        parsed = Manifest.parse(manifest, f"upload {name}@{version}")
        if (parsed.name, parsed.version) != (name, version):
            raise ProgramError(f"upload {name}@{version}: its Pie.toml says {parsed.spec}; make them agree")
        program = Program(parsed, "uploaded", uploaded=MappingProxyType(dict(files)))
        check_entry(program)
        key = (name, version)
        existing = self._uploaded.get(key)
        if existing is not None and not force and existing.files() != program.files():
            raise ProgramError(f"{name}@{version} is already installed with different files; bump the "
                               "version or upload with force_overwrite")
        self._uploaded[key] = program
        return program.info()

    def _all(self) -> dict[tuple[str, str], Program]:
        return {**self._found, **self._uploaded}

    def _lookup(self, spec: str) -> Program | None:
        everything = self._all()
        name, _, version = spec.partition("@")
        if version:
            return everything.get((name, version))
        versions = [v for (n, v) in everything if n == name]
        return everything[(name, max(versions, key=_version_key))] if versions else None


def _table(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def check_entry(program: Program) -> None:
    """The entry file parses and defines the entry function at top level (sync or async)."""
    try:
        source = program.source()
        tree = ast.parse(source, filename=f"{program.spec}/{ENTRY_FILE}")
    except UnicodeDecodeError as e:
        raise ProgramError(f"{program.spec}: {ENTRY_FILE} is not UTF-8 ({e})") from None
    except SyntaxError as e:
        raise ProgramError(f"{program.spec}: syntax error in {ENTRY_FILE} line {e.lineno}: {e.msg}") from None
    entry = program.manifest.entry
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    if entry not in defined:
        raise ProgramError(f"{program.spec}: {ENTRY_FILE} defines no top-level function {entry}(); "
                           f"found {sorted(defined) or 'none'}. Define `def {entry}(input: dict)`")


def _scan(folder: Path) -> Iterable[Program | ProgramError]:
    """The packages in `folder`; a malformed one yields ProgramError(message, path) instead."""
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        if path.is_dir() and (path / MANIFEST_FILE).is_file():
            try:
                manifest = Manifest.parse((path / MANIFEST_FILE).read_text(), str(path / MANIFEST_FILE))
            except ProgramError as e:
                yield ProgramError(str(e), str(path))
                continue
            yield Program(manifest, str(path), root=path)
        elif path.is_file() and path.suffix == ".py" and not path.name.startswith(("_", ".")):
            yield Program(_single_file_manifest(path), str(path), root=path)


def _single_file_manifest(path: Path) -> Manifest:
    try:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    except SyntaxError:
        doc = ""  # reported with its line number when launched (check_entry)
    return Manifest(name=path.stem.replace("_", "-"), version="0.0.0", description=doc.strip().split("\n")[0])


def _version_key(version: str) -> tuple[int, Version | str]:
    try:
        return (1, Version(version))
    except InvalidVersion:
        return (0, version)
