"""flavors/*.toml and their one Python reader, pie.flavors: loading, validation, detection, and the
copy of the table that install.sh embeds for `curl | bash` installs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from timing import scaled

from pie.errors import FlavorError
from pie.flavors import (
    FLAVOR_ENV,
    detect_flavor,
    driver_version_from_proc,
    embedded_block,
    installed_flavor,
    load_flavors,
    parse_driver_version,
)

REPO = Path(__file__).resolve().parent.parent
FLAVORS_DIR = REPO / "flavors"
ALL_FLAVORS = {"cuda12.6", "cuda12.8", "cuda13.0", "portable",
               "portable-cuda12.6", "portable-cuda12.8", "portable-cuda13.0"}


def test_the_seven_flavors_load_with_their_builds() -> None:
    flavors = load_flavors(FLAVORS_DIR)
    assert set(flavors) == ALL_FLAVORS
    assert flavors["portable"].torch_build == "cpu" and not flavors["portable"].has_flashinfer
    for cuda in ("12.6", "12.8", "13.0"):
        tag = "cu" + cuda.replace(".", "")
        full, bare = flavors[f"cuda{cuda}"], flavors[f"portable-cuda{cuda}"]
        assert full.torch_build == bare.torch_build == tag
        assert full.torch_index_url.endswith("/" + tag) and bare.torch_index_url == full.torch_index_url
        assert full.has_flashinfer and full.extras == ("cuda",) and full.attention_backend == "flashinfer"
        assert not bare.has_flashinfer and bare.extras == () and bare.attention_backend == "torch_ref"
    assert {f.name for f in flavors.values() if f.auto} == {"cuda12.8", "cuda13.0", "portable"}


@pytest.mark.parametrize(("driver", "expected"), [
    ("470", "portable"), ("470.82.01", "portable"), ("524.99", "portable"),
    ("525", "cuda12.8"), ("525.60", "cuda12.8"), ("525.60.13", "cuda12.8"), ("550", "cuda12.8"),
    ("579.99.9", "cuda12.8"), ("580", "cuda13.0"), ("580.1", "cuda13.0"), ("610.2", "cuda13.0"),
    (None, "portable"), ("", "portable"), ("garbage", "portable"),
    ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", "portable"),
    ("550.54.14\n550.54.14\n", "cuda12.8"),  # one line per GPU
])
def test_detect_flavor_follows_the_driver_thresholds(driver: str | None, expected: str) -> None:
    assert detect_flavor(driver, load_flavors(FLAVORS_DIR)).name == expected


def test_parse_driver_version() -> None:
    assert parse_driver_version(" 550.54.14 \n") == (550, 54, 14)
    assert parse_driver_version("v550") is None
    assert parse_driver_version("550.") is None


def test_driver_version_from_proc_file() -> None:
    proprietary = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC 2024\n"
                   "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    open_module = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build\n"
    assert driver_version_from_proc(proprietary) == "550.54.14"
    assert driver_version_from_proc(open_module) == "580.65.06"
    assert driver_version_from_proc("GCC version: 12.2.0\n") is None


def test_thresholds_are_data(tmp_path: Path) -> None:
    """Moving cuda13.0's threshold in its file moves detection; no code holds the numbers."""
    folder = _copy_flavors(tmp_path)
    _edit(folder / "cuda13.0.toml", 'min_version = "580"', 'min_version = "600"')
    flavors = load_flavors(folder)
    assert detect_flavor("590.1", flavors).name == "cuda12.8"
    assert detect_flavor("600.0", flavors).name == "cuda13.0"


@pytest.mark.parametrize(("file", "old", "new", "message"), [
    ("cuda12.8.toml", 'build = "cu128"\nindex', 'build = "cu126"\nindex', "torch.build is 'cu126'"),
    ("cuda12.8.toml", 'extras = ["cuda"]', "extras = []", 'extras = ["cuda"]'),
    ("cuda12.8.toml", 'device = "cuda:0"\n', "", "missing key `device`"),
    ("cuda12.8.toml", "auto = true", 'auto = "yes"', "`driver.auto` is 'yes'; it must be true or false"),
    ("cuda12.8.toml", "https://download.pytorch.org/whl/cu128", "http://mirror/cu128", "not an https URL"),
    ("portable-cuda12.8.toml", 'build = "none"', 'build = "cu128"', 'extras = ["cuda"]'),
    ("portable.toml", 'min_version = ""', 'min_version = "x"', "driver.min_version 'x'"),
    ("cuda12.8.toml", "[torch]", "[torch", "not valid TOML"),
])
def test_a_bad_flavor_file_names_the_file_and_the_problem(tmp_path: Path, file: str, old: str, new: str,
                                                          message: str) -> None:
    folder = _copy_flavors(tmp_path)
    _edit(folder / file, old, new)
    with pytest.raises(FlavorError, match=re.escape(str(folder / file))) as raised:
        load_flavors(folder)
    assert message in str(raised.value)


def test_detection_must_be_unambiguous(tmp_path: Path) -> None:
    folder = _copy_flavors(tmp_path)
    _edit(folder / "cuda12.6.toml", "auto = false", "auto = true")  # same min_version (525) as cuda12.8
    with pytest.raises(FlavorError, match=re.escape("cuda12.6 and cuda12.8 share driver.min_version 525")):
        load_flavors(folder)
    folder = _copy_flavors(tmp_path / "second")
    _edit(folder / "portable.toml", "auto = true", "auto = false")
    with pytest.raises(FlavorError, match=re.escape("0 auto flavors without driver.min_version")):
        load_flavors(folder)


def test_installed_flavor_reads_pie_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FLAVOR_ENV, raising=False)
    flavors = load_flavors(FLAVORS_DIR)
    assert installed_flavor(tmp_path, flavors) is None  # not installed by install.sh
    (tmp_path / "flavor").write_text("portable-cuda12.8\n")
    flavor = installed_flavor(tmp_path, flavors)
    assert flavor is not None and flavor.name == "portable-cuda12.8"
    monkeypatch.setenv("PIE_HOME", str(tmp_path))
    assert installed_flavor() == flavor  # PIE_HOME and the checkout's flavors/ by default
    monkeypatch.setenv(FLAVOR_ENV, "cuda13.0")  # what a Nix package's wrapper sets wins
    assert installed_flavor(tmp_path, flavors) == flavors["cuda13.0"]
    monkeypatch.delenv(FLAVOR_ENV)
    (tmp_path / "flavor").write_text("cuda99\n")
    with pytest.raises(FlavorError, match=r"names flavor 'cuda99', which is not one of cuda12\.6, .*portable"):
        installed_flavor(tmp_path, flavors)


def test_install_sh_embeds_the_current_table() -> None:
    """The `curl | bash` installer has no flavors/ beside it; its copy must equal the files."""
    block = embedded_block(load_flavors(FLAVORS_DIR).values())
    assert block in (REPO / "install.sh").read_text(), (
        "install.sh's embedded flavor table is stale: run `python -m pie.flavors embed install.sh`")


def test_module_command_line() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pie.flavors", *args], capture_output=True, text=True,
                              cwd=REPO, timeout=scaled(60), check=False)

    assert run("detect", "575.1").stdout == "cuda12.8\n"
    table = run("table", str(FLAVORS_DIR))
    assert table.returncode == 0 and len(table.stdout.splitlines()) == 7
    missing = run("table", "/nonexistent")
    assert missing.returncode == 1 and "holds no flavor .toml files" in missing.stderr


def _copy_flavors(tmp_path: Path) -> Path:
    folder = tmp_path / "flavors"
    shutil.copytree(FLAVORS_DIR, folder)
    return folder


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path.name} no longer contains {old!r}; update the test"
    path.write_text(text.replace(old, new, 1))
