"""An inferlet package's Python dependencies: `pie inferlet install` installs what its pyproject.toml
declares, with pip, from the configured index only (here: a local folder of wheels, pip's own
`PIP_NO_INDEX`/`PIP_FIND_LINKS` configuration), into the package's own folder; a launch only checks they
are there, trusted and isolated; nothing is installed at launch."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

import pytest
from inferlet_helpers import launch, start_runtime
from typer.testing import CliRunner

from pie.cli.main import app
from pie.runtime.sandbox import SandboxPolicy
from pie.tiny_model import ensure_tiny_model

PROGRAM = "import pie_dep_probe\n\ndef main(input):\n    return pie_dep_probe.VALUE\n"
MANIFEST = '[package]\nname = "uses-dep"\nversion = "0.1.0"\n'


def make_wheel(folder: Path) -> None:
    """A real wheel of `pie-dep-probe` 1.0 (pure Python), written as the wheel format specifies."""
    files = {"pie_dep_probe/__init__.py": b'VALUE = "from a dependency"\n',
             "pie_dep_probe-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: pie-dep-probe\nVersion: 1.0\n",
             "pie_dep_probe-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                  b"Tag: py3-none-any\n"}
    record = "".join(f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for name, data in files.items())
    record += "pie_dep_probe-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(folder / "pie_dep_probe-1.0-py3-none-any.whl", "w") as whl:
        for name, data in files.items():
            whl.writestr(name, data)
        whl.writestr("pie_dep_probe-1.0.dist-info/RECORD", record)


def make_package(folder: Path, dependency: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "main.py").write_text(PROGRAM)
    (folder / "Pie.toml").write_text(MANIFEST)
    (folder / "pyproject.toml").write_text(f'[project]\nname = "uses-dep"\nversion = "0.1.0"\n'
                                           f'dependencies = ["{dependency}"]\n')
    return folder


@pytest.fixture
def index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    return wheels


def install(home: Path, package: Path) -> tuple[int, str]:
    home.mkdir(parents=True, exist_ok=True)
    result = CliRunner().invoke(app, ["inferlet", "install", str(package), "-c", str(home / "none.toml")],
                                env={"PIE_HOME": str(home)})
    return result.exit_code, result.output


async def test_installed_dependencies_are_importable_trusted_and_isolated(tmp_path: Path, index: Path) -> None:
    home = tmp_path / "home"
    (home / "none.toml").parent.mkdir(parents=True)
    (home / "none.toml").write_text("")
    code, out = install(home, make_package(tmp_path / "src" / "uses-dep", "pie-dep-probe==1.0"))
    assert code == 0, out
    assert "installed its dependencies: pie-dep-probe==1.0" in out
    installed = home / "inferlets" / "uses-dep"
    assert (installed / ".deps" / "pie_dep_probe" / "__init__.py").is_file()

    model = ensure_tiny_model(tmp_path / "model-home")
    for sandbox in (None, SandboxPolicy()):
        rt = await start_runtime(model, paths=(home / "inferlets",))
        rt.sandbox = sandbox
        try:
            final, _ = await launch(rt, "uses-dep", {})
        finally:
            await rt.shutdown(0)
        assert (final.kind, final.value) == ("return", "from a dependency"), sandbox


async def test_declared_but_not_installed_is_refused_at_launch(tmp_path: Path) -> None:
    folder = make_package(tmp_path / "by-hand" / "uses-dep", "pie-dep-probe==1.0")
    rt = await start_runtime(ensure_tiny_model(tmp_path / "model-home"), paths=(folder.parent,))
    try:
        final, _ = await launch(rt, "uses-dep", {})
    finally:
        await rt.shutdown(0)
    assert final.kind == "error"
    assert "declares dependencies (pie-dep-probe==1.0) that are not installed" in final.value
    assert "pie inferlet install" in final.value


def test_a_dependency_naming_its_own_source_or_missing_from_the_index_is_refused(tmp_path: Path,
                                                                                 index: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "none.toml").write_text("")
    code, out = install(home, make_package(tmp_path / "a" / "uses-dep", "evil @ https://example.com/evil.whl"))
    assert code == 1 and "names its own source" in out
    code, out = install(home, make_package(tmp_path / "b" / "uses-dep", "no-such-package-pie==9.9"))
    assert code == 1 and "pip could not install no-such-package-pie==9.9" in out
    assert not (home / "inferlets" / "uses-dep").exists()  # nothing half-installed
