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

Where programs come from, in three namespaces searched in this order for a
user's launch:

1. the user's own uploads (`add`: the files and manifest text a client sends);
   they belong to the uploader and no other user ever sees or runs them;
2. the standard library (`inferlets/` beside the `pie` package, also in the
   wheel);
3. what the operator installed: `$PIE_HOME/inferlets` (default
   `~/.pie/inferlets`), then the configured extra folders (a later folder wins
   for the same name@version).

`name@version` is looked up in that order; a bare `name` takes the highest
version of the first namespace that has the name. No upload can replace a
standard inferlet (an upload of a standard name@version is refused unless it
is byte-identical) and an upload lands only in its uploader's namespace, so
`force_overwrite` can only ever replace the uploader's own program.
`name@version#sha256=<hex>` pins a standard inferlet by its content hash
(`ProgramRegistry.standard_spec`): what server-internal launches (the
OpenAI-compatible API) use, so no upload can stand in for them.
"""

from __future__ import annotations

import ast
import hashlib
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
_SKIP_PARTS = {"__pycache__", ".git", ".deps"}  # .deps: installed dependencies (pie.runtime.deps)


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

    def digest(self) -> str:
        """sha256 over the manifest and every file (path and bytes): what a pinned spec names."""
        h = hashlib.sha256()
        for path, data in sorted(self.files().items()):
            h.update(f"{len(path)}:{path}:{len(data)}:".encode())
            h.update(data)
        return h.hexdigest()

    def source(self) -> str:
        files = self.files()
        if ENTRY_FILE not in files:
            raise ProgramError(f"{self.spec} ({self.origin}) has no {ENTRY_FILE}")
        return files[ENTRY_FILE].decode("utf-8")


def operator_paths(pie_home: Path | None = None, extra: Iterable[Path] = ()) -> list[Path]:
    """The operator's folders: `$PIE_HOME/inferlets` (default ~/.pie/inferlets), then `extra`."""
    home = pie_home or Path(os.environ.get("PIE_HOME", Path.home() / ".pie"))
    return [home / "inferlets", *extra]


def stdlib_path() -> Path:
    """`inferlets/` beside the `pie` package: the repository root in a checkout, site-packages in a wheel."""
    import pie

    return Path(pie.__file__).resolve().parent.parent / "inferlets"


Key = tuple[str, str]  # (name, version)
PIN = "#sha256="


class ProgramRegistry:
    """Installed and uploaded programs, resolved per user (see the module docstring for the order).

    `search_paths` are the operator's folders; `standard` the standard library's (None: none, for tests
    of a registry of one's own folders). `max_upload_bytes_per_user` caps what one user's uploads hold
    in memory together (0 = no cap)."""

    def __init__(self, search_paths: Iterable[Path], *, standard: Path | None = None,
                 max_upload_bytes_per_user: int = 0) -> None:
        self.search_paths = [Path(p).expanduser() for p in search_paths]
        self.standard_path = standard
        self.max_upload_bytes_per_user = max_upload_bytes_per_user
        self._uploaded: dict[str, dict[Key, Program]] = {}  # owner -> that user's uploads
        self._standard: dict[Key, Program] = {}
        self._found: dict[Key, Program] = {}  # the operator's
        self.broken: dict[str, str] = {}  # folder -> why it is not a package (shown when a lookup fails)
        self.refresh()

    def refresh(self) -> None:
        """Rescan the folders (done again automatically when a name is not found)."""
        broken: dict[str, str] = {}
        self._standard = _scan_all([self.standard_path] if self.standard_path else [], broken)
        self._found = _scan_all(self.search_paths, broken)
        self.broken = broken

    def programs(self, username: str | None = None) -> list[ProgramInfo]:
        """What `username` can launch (None: the installed programs only), each name@version once."""
        return [p.info() for p in self._visible(username).values()]

    def has(self, spec: str, username: str | None = None) -> bool:
        try:
            self.resolve(spec, username)
        except ProgramError:
            return False
        return True

    def resolve(self, spec: str, username: str | None = None) -> Program:
        """`name@version`, `name` (its highest version) or a pinned `name@version#sha256=...`, as
        `username` sees them: their own uploads, then the standard library, then the operator's."""
        program = self._lookup(spec, username)
        if program is None:
            self.refresh()
            program = self._lookup(spec, username)
        if program is None:
            if PIN in spec:
                raise ProgramError(f"no standard inferlet {spec!r}: the standard library changed since the "
                                   "server started, or the pin is wrong; restart the server")
            names = sorted(f"{n}@{v}" for n, v in self._visible(username))
            skipped = "".join(f"; skipped {path}: {why}" for path, why in self.broken.items())
            raise ProgramError(f"no inferlet {spec!r}; available: {', '.join(names) or 'none'}{skipped}. "
                               f"Install it into {self.search_paths[0] if self.search_paths else 'a folder'} "
                               "or upload it")
        return program

    def standard_spec(self, name: str) -> str:
        """The pinned spec (`name@version#sha256=<hex>`) of the highest version of standard inferlet `name`."""
        versions = [v for (n, v) in self._standard if n == name]
        if not versions:
            self.refresh()
            versions = [v for (n, v) in self._standard if n == name]
        if not versions:
            raise ProgramError(f"the standard library ({self.standard_path}) has no inferlet {name!r}; "
                               "reinstall pie")
        program = self._standard[(name, max(versions, key=_version_key))]
        return f"{program.spec}{PIN}{program.digest()}"

    def add(self, name: str, version: str, files: Mapping[str, bytes], manifest: str, *, owner: str,
            force: bool = False) -> ProgramInfo:
        """Register `owner`'s upload. Their own same name@version again is refused unless `force` (or
        unless it is byte-identical, which makes retries harmless); a standard inferlet's name@version
        is refused unless byte-identical (then the upload is a no-op)."""
        parsed = Manifest.parse(manifest, f"upload {name}@{version}")
        if (parsed.name, parsed.version) != (name, version):
            raise ProgramError(f"upload {name}@{version}: its Pie.toml says {parsed.spec}; make them agree")
        program = Program(parsed, f"uploaded by {owner}", uploaded=MappingProxyType(dict(files)))
        check_entry(program)
        key = (name, version)
        standard = self._standard.get(key)
        if standard is not None:
            if standard.files() != program.files():
                raise ProgramError(f"{name}@{version} is a standard inferlet and cannot be replaced "
                                   "(force_overwrite applies only to your own uploads); upload it under "
                                   "another name or version")
            return standard.info()
        own = self._uploaded.setdefault(owner, {})
        existing = own.get(key)
        if existing is not None and not force and existing.files() != program.files():
            raise ProgramError(f"{name}@{version} is already installed with different files; bump the "
                               "version or upload with force_overwrite")
        self._check_upload_bytes(owner, program, existing)
        own[key] = program
        return program.info()

    def _check_upload_bytes(self, owner: str, program: Program, replaced: Program | None) -> None:
        cap = self.max_upload_bytes_per_user
        if not cap:
            return
        held = sum(_size(p) for p in self._uploaded.get(owner, {}).values()) - (_size(replaced) if replaced else 0)
        if held + _size(program) > cap:
            raise ProgramError(f"user {owner!r}'s uploads would hold {held + _size(program)} bytes, over the "
                               f"limit of {cap} ([runtime] max_upload_bytes_per_user); re-upload with "
                               "force_overwrite to replace an old version, or raise the limit")

    def _visible(self, username: str | None) -> dict[Key, Program]:
        """Every name@version `username` can launch, each the one it resolves to."""
        own = self._uploaded.get(username, {}) if username is not None else {}
        return {**self._found, **self._standard, **own}

    def _lookup(self, spec: str, username: str | None) -> Program | None:
        spec, pin, digest = spec.partition(PIN)
        name, _, version = spec.partition("@")
        if pin:
            program = self._standard.get((name, version))
            return program if program is not None and program.digest() == digest else None
        own = self._uploaded.get(username, {}) if username is not None else {}
        for namespace in (own, self._standard, self._found):
            if version:
                if (name, version) in namespace:
                    return namespace[(name, version)]
                continue
            versions = [v for (n, v) in namespace if n == name]
            if versions:
                return namespace[(name, max(versions, key=_version_key))]
        return None


def _size(program: Program) -> int:
    return sum(len(data) for data in (program.uploaded or {}).values())


def _scan_all(folders: Iterable[Path], broken: dict[str, str]) -> dict[Key, Program]:
    """The packages of `folders` (a later folder wins for the same name@version); malformed ones go to
    `broken` (folder -> why)."""
    found: dict[Key, Program] = {}
    for folder in folders:
        for item in _scan(folder):
            if isinstance(item, ProgramError):
                broken[str(item.args[1])] = str(item.args[0])
            else:
                found[(item.manifest.name, item.manifest.version)] = item
    return found


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
