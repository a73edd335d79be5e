"""The program registry: packages on disk and uploaded, name/version resolution, clear failures, the wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from checkout_copy import clean_copy

from pie.errors import ProgramError
from pie.runtime.programs import Manifest, ProgramRegistry, check_entry, operator_paths, stdlib_path

STANDARD = {"text-completion", "chat", "best-of-n", "beam-search", "constrained-json", "speculative-decoding",
            "attention-sink", "modular-cache", "agent-react", "agent-mcp", "watermark", "tree-of-thought",
            "messaging-producer", "messaging-consumer"}


def package(folder: Path, name: str, version: str, body: str = "def main(input):\n    return 'ok'\n",
            extra: str = "") -> Path:
    folder.mkdir(parents=True)
    (folder / "Pie.toml").write_text(f'[package]\nname = "{name}"\nversion = "{version}"\n{extra}')
    (folder / "main.py").write_text(body)
    return folder


def test_standard_library_is_complete_and_well_formed() -> None:
    registry = ProgramRegistry([], standard=stdlib_path())
    names = {p.name for p in registry.programs()}
    assert names >= STANDARD
    for info in registry.programs():
        program = registry.resolve(f"{info.name}@{info.version}")
        check_entry(program)  # parses, defines main()
        assert info.description, f"{info.name} has no description"
        assert info.parameters, f"{info.name} documents no [parameters]"


def test_versions_user_folders_and_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    package(home / "inferlets" / "tool-a", "tool", "0.2.0")
    package(home / "inferlets" / "tool-b", "tool", "0.10.0")  # semver: 0.10 > 0.2
    extra = tmp_path / "extra"
    package(extra / "mine", "text-completion", "0.1.0", "def main(input):\n    return 'override'\n")
    (extra / "quick_hack.py").write_text('"""A one-file inferlet."""\n\ndef main(input):\n    return 1\n')
    monkeypatch.setenv("PIE_HOME", str(home))
    registry = ProgramRegistry(operator_paths(extra=[extra]), standard=stdlib_path())
    assert registry.resolve("tool").manifest.version == "0.10.0"
    assert registry.resolve("tool@0.2.0").origin.endswith("tool-a")
    # The standard library comes before the operator's folders for the same name@version.
    assert "override" not in registry.resolve("text-completion@0.1.0").source()
    single = registry.resolve("quick-hack")
    assert (single.manifest.version, single.info().description) == ("0.0.0", "A one-file inferlet.")
    assert registry.has("tool@0.10.0") and not registry.has("tool@9.9.9")


def test_unknown_program_lists_what_exists_and_broken_packages(tmp_path: Path) -> None:
    package(tmp_path / "good", "good", "1.0.0")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "Pie.toml").write_text("[package]\nname = 'bad'\n")  # no version
    registry = ProgramRegistry([tmp_path])
    with pytest.raises(ProgramError) as err:
        registry.resolve("nope")
    message = str(err.value)
    assert "no inferlet 'nope'" in message and "good@1.0.0" in message
    assert "skipped" in message and "version" in message


def test_new_folders_are_found_without_restart(tmp_path: Path) -> None:
    registry = ProgramRegistry([tmp_path])
    assert not registry.has("late")
    package(tmp_path / "late", "late", "0.1.0")
    assert registry.resolve("late").manifest.name == "late"


def test_uploads_check_manifest_entry_and_overwrites(tmp_path: Path) -> None:
    registry = ProgramRegistry([tmp_path])
    manifest = '[package]\nname = "up"\nversion = "1.0.0"\n[runtime]\nentry = "run"\ncall = "kwargs"\n'
    files = {"main.py": b"async def run(x=1):\n    return x\n"}
    info = registry.add("up", "1.0.0", files, manifest, owner="alice")
    assert (info.name, info.version) == ("up", "1.0.0")
    assert registry.resolve("up", "alice").manifest == Manifest("up", "1.0.0", entry="run", call="kwargs")
    registry.add("up", "1.0.0", files, manifest, owner="alice")  # the same bytes again: harmless
    changed = {"main.py": b"async def run(x=2):\n    return x\n"}
    with pytest.raises(ProgramError, match="already installed with different files"):
        registry.add("up", "1.0.0", changed, manifest, owner="alice")
    registry.add("up", "1.0.0", changed, manifest, owner="alice", force=True)
    assert "x=2" in registry.resolve("up@1.0.0", "alice").source()

    with pytest.raises(ProgramError, match=r"its Pie\.toml says up@1\.0\.0"):
        registry.add("up", "2.0.0", files, manifest, owner="alice")
    with pytest.raises(ProgramError, match=r"syntax error in main\.py line 1"):
        registry.add("up", "1.0.0", {"main.py": b"def run(:\n"}, manifest, owner="alice", force=True)
    with pytest.raises(ProgramError, match=r"no top-level function run\(\); found \['other'\]"):
        registry.add("up", "1.0.0", {"main.py": b"def other():\n    pass\n"}, manifest, owner="alice",
                     force=True)
    with pytest.raises(ProgramError, match=r"call must be"):
        Manifest.parse('[package]\nname = "x"\nversion = "1"\n[runtime]\ncall = "argv"\n', "test")
    with pytest.raises(ProgramError, match="not valid TOML"):
        Manifest.parse("[package", "test")


@pytest.mark.slow
def test_the_wheel_ships_the_standard_library(tmp_path: Path) -> None:
    source = clean_copy(tmp_path / "src")  # not the live checkout: the build would leave files in it
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("pie-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in STANDARD:
        assert f"inferlets/{name}/Pie.toml" in names and f"inferlets/{name}/main.py" in names, name
    assert "pie/runtime/programs.py" in names and "inferlet/context.py" in names
