"""install.sh, run as a user would: flavor detection through --print-flavor with a fake nvidia-smi,
a full offline install of a wheel built from this checkout into a temporary PIE_HOME, re-runs,
the user's files, --service (user unit), --uninstall, the Nix path (with a fake nix), failures.

The installer runs with a PATH of plain tools only (no real nvidia-smi or nix), a fake HOME, and
pip options that take torch 2.13.0 (CPU) from this machine's local wheel.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from checkout_copy import clean_copy
from timing import scaled

from pie.flavors import detect_flavor, load_flavors

REPO = Path(__file__).resolve().parent.parent
INSTALL_SH = REPO / "install.sh"
FLAVOR_NAMES = sorted(load_flavors(REPO / "flavors"))
# What install.sh may call; anything else (nvidia-smi, nix, systemctl) a test provides, or it is absent.
TOOLS = ("bash", "sh", "env", "cat", "sed", "grep", "awk", "tr", "head", "tail", "find", "mkdir", "rm",
         "rmdir", "mv", "cp", "chmod", "chown", "touch", "mktemp", "dirname", "basename", "id", "uname",
         "install", "ln", "ls", "readlink")
CLI_READY = (REPO / "pie" / "cli" / "main.py").is_file()
needs_cli = pytest.mark.skipif(not CLI_READY, reason="pie.cli.main (the `pie` command) is not in this checkout yet")


def tool_dir(tmp_path: Path, scripts: dict[str, str] | None = None) -> Path:
    """A PATH folder with the standard tools linked in and the given fake programs written."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    for tool in TOOLS:
        found = shutil.which(tool)
        if found and not (folder / tool).exists():
            (folder / tool).symlink_to(found)
    for name, body in (scripts or {}).items():
        (folder / name).write_text(body)
        (folder / name).chmod(0o755)
    return folder


def installer_env(tmp_path: Path, path_dir: Path, **values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIE_", "XDG_", "VIRTUAL_ENV"))}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(
        HOME=str(home),
        PATH=str(path_dir),
        PIE_PYTHON=sys.executable,
        PIE_NVIDIA_VERSION_FILE=str(tmp_path / "no-nvidia-module"),  # as on a machine without the driver
        PIP_CACHE_DIR=os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip")),
    )
    env.update(values)
    return env


def run_installer(env: dict[str, str], *args: str, script: Path = INSTALL_SH,
                  timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def nvidia_smi(output: str, status: int = 0) -> str:
    return f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\nexit {status}\n"


def mini_checkout(tmp_path: Path) -> Path:
    """The parts of a checkout install.sh looks at, copied (the live checkout changes under other work)."""
    checkout = tmp_path / "checkout"
    for part in ("install.sh", "pyproject.toml", "flake.nix", "flavors", "pie/__init__.py", "pie/errors.py",
                 "pie/flavors.py"):
        source, target = REPO / part, checkout / part
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    return checkout


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under root with its (mode, size, mtime); bytecode caches that Python writes when the
    installed pie runs are not the installer's doing and are left out."""
    found = {}
    for path in [root, *root.rglob("*")]:
        if "__pycache__" in path.parts:
            continue
        info = path.lstat()
        found[str(path.relative_to(root))] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return found


# --- flavor detection ---------------------------------------------------------------------------

DRIVER_CASES = {  # what nvidia-smi prints (None: no nvidia-smi) -> (exit status, flavor)
    "470": ("470.82.01", 0, "portable"),
    "525.60": ("525.60.13", 0, "cuda12.8"),
    "550": ("550", 0, "cuda12.8"),
    "580.1": ("580.1", 0, "cuda13.0"),
    "two GPUs": ("575.57.08\n575.57.08", 0, "cuda12.8"),
    "missing": (None, 0, "portable"),
    "garbage": ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", 9, "portable"),
    "garbage, exit 0": ("Driver Version: unknown", 0, "portable"),
}


@pytest.fixture(params=["checkout", "standalone"])
def installer(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """install.sh in this checkout (reads flavors/), or alone as `curl | bash` runs it (embedded table)."""
    if request.param == "checkout":
        return INSTALL_SH
    alone = tmp_path / "alone" / "install.sh"
    alone.parent.mkdir()
    shutil.copy(INSTALL_SH, alone)
    return alone


@pytest.mark.parametrize("case", DRIVER_CASES)
def test_print_flavor_detects_from_the_driver(tmp_path: Path, installer: Path, case: str) -> None:
    output, status, expected = DRIVER_CASES[case]
    fakes = {} if output is None else {"nvidia-smi": nvidia_smi(output, status)}
    result = run_installer(installer_env(tmp_path, tool_dir(tmp_path, fakes)), "--print-flavor",
                           script=installer)
    assert (result.returncode, result.stdout) == (0, expected + "\n"), result.stderr
    assert detect_flavor(None if status else output).name == expected  # the Python reader agrees
    if case.startswith("garbage"):
        assert "nvidia-smi" in result.stderr  # says why it fell back


def test_print_flavor_reads_the_kernel_module_version_file(tmp_path: Path) -> None:
    proc = tmp_path / "version"
    proc.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build\n")
    env = installer_env(tmp_path, tool_dir(tmp_path), PIE_NVIDIA_VERSION_FILE=str(proc))
    assert run_installer(env, "--print-flavor").stdout == "cuda13.0\n"


@pytest.mark.parametrize("name", FLAVOR_NAMES)
def test_pie_flavor_overrides_detection(tmp_path: Path, installer: Path, name: str) -> None:
    env = installer_env(tmp_path, tool_dir(tmp_path, {"nvidia-smi": nvidia_smi("470.1")}), PIE_FLAVOR=name)
    result = run_installer(env, "--print-flavor", script=installer)
    assert (result.returncode, result.stdout) == (0, name + "\n"), result.stderr


def test_an_unknown_flavor_is_refused_with_the_valid_ones(tmp_path: Path, installer: Path) -> None:
    env = installer_env(tmp_path, tool_dir(tmp_path), PIE_FLAVOR="cuda11.8", PIE_HOME=str(tmp_path / "prefix"))
    for args in (["--print-flavor"], []):
        result = run_installer(env, *args, script=installer)
        assert result.returncode == 1 and result.stdout == ""
        assert "unknown flavor 'cuda11.8'" in result.stderr
        assert all(name in result.stderr for name in FLAVOR_NAMES)
    assert not (tmp_path / "prefix").exists()


def test_print_flavor_follows_edited_flavor_files_and_touches_nothing(tmp_path: Path) -> None:
    """A checkout's flavor files drive install.sh (the thresholds are data), and --print-flavor
    writes nothing: not in PIE_HOME, not in the checkout (no bytecode either)."""
    checkout = mini_checkout(tmp_path)
    toml = checkout / "flavors" / "cuda13.0.toml"
    toml.write_text(toml.read_text().replace('min_version = "580"', 'min_version = "560"'))
    before = snapshot(checkout)
    env = installer_env(tmp_path, tool_dir(tmp_path, {"nvidia-smi": nvidia_smi("565.1")}),
                        PIE_HOME=str(tmp_path / "prefix"))
    result = run_installer(env, "--print-flavor", script=checkout / "install.sh")
    assert result.stdout == "cuda13.0\n", result.stderr
    assert snapshot(checkout) == before
    assert not (tmp_path / "prefix").exists()


# --- refusals -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "values", "message"), [
    (["--frobnicate"], {}, "unknown option '--frobnicate'"),
    (["--purge"], {}, "--purge goes with --uninstall"),
    ([], {"PIE_SOURCE": "/nonexistent/pie.whl"}, "PIE_SOURCE=/nonexistent/pie.whl does not exist"),
    ([], {"PIE_SOURCE": "/tmp", "PIE_VERSION": "0.1.0"}, "PIE_SOURCE and PIE_VERSION are both set"),
    ([], {"PIE_SOURCE": "/", }, "is not a pie checkout"),
    ([], {"PIE_USE_NIX": "maybe"}, "PIE_USE_NIX=maybe; use auto, 1 or 0"),
    ([], {"PIE_USE_NIX": "1"}, "nix is not on PATH"),
    ([], {"PIE_PYTHON": "/bin/false", "PIE_USE_NIX": "0"}, "pie needs Python 3.11 or newer"),
])
def test_mistakes_are_refused_with_what_to_do(tmp_path: Path, args: list[str], values: dict[str, str],
                                              message: str) -> None:
    env = installer_env(tmp_path, tool_dir(tmp_path), PIE_HOME=str(tmp_path / "prefix"), **values)
    result = run_installer(env, *args)
    assert result.returncode == 1
    assert message in result.stderr
    assert not (tmp_path / "prefix").exists()


def test_a_release_that_cannot_be_downloaded_fails_clearly(tmp_path: Path) -> None:
    env = installer_env(tmp_path, tool_dir(tmp_path), PIE_HOME=str(tmp_path / "prefix"), PIE_USE_NIX="0",
                        PIE_VERSION="9.9.9", PIE_RELEASE_URL=f"file://{tmp_path}/releases")
    result = run_installer(env)
    assert result.returncode == 1
    assert f"could not download file://{tmp_path}/releases/v9.9.9/pie-9.9.9-py3-none-any.whl" in result.stderr
    assert "check PIE_VERSION" in result.stderr
    assert not (tmp_path / "prefix" / ".install-stamp").exists()  # a re-run will not think it is done


def test_shellcheck_is_clean() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", str(INSTALL_SH)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


def test_the_default_release_is_this_version() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert f'PIE_INSTALLER_VERSION="{version}"' in INSTALL_SH.read_text()


# --- the Nix path, with a fake nix ----------------------------------------------------------------

FAKE_NIX = """#!/bin/sh
# Records its arguments and makes --out-link point at a prebuilt "store path".
printf '%s\\n' "$*" >> "$FAKE_NIX_LOG"
while [ $# -gt 0 ]; do
  if [ "$1" = --out-link ]; then ln -sfn "$FAKE_NIX_STORE" "$2"; fi
  shift
done
"""


def test_nix_builds_the_flavor_from_the_flake(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / "bin").mkdir(parents=True)
    (store / "bin" / "pie").write_text('#!/bin/sh\necho "nix pie $* home=$PIE_HOME"\n')
    (store / "bin" / "pie").chmod(0o755)
    log, home, checkout = tmp_path / "nix.log", tmp_path / "prefix", mini_checkout(tmp_path)
    env = installer_env(tmp_path, tool_dir(tmp_path, {"nix": FAKE_NIX}), PIE_HOME=str(home),
                        PIE_FLAVOR="cuda12.8", PIE_SOURCE=str(checkout), FAKE_NIX_LOG=str(log),
                        FAKE_NIX_STORE=str(store))
    result = run_installer(env)  # PIE_USE_NIX=auto: nix is on PATH and the source has flake.nix
    assert result.returncode == 0, result.stderr
    assert log.read_text() == (f"--extra-experimental-features nix-command flakes build --out-link "
                               f"{home}/nix-profile path:{checkout}#cuda12_8\n")
    ran = subprocess.run([str(home / "bin" / "pie"), "serve"], env={"PATH": env["PATH"]}, capture_output=True,
                         text=True, check=True)
    assert ran.stdout == f"nix pie serve home={home}\n"
    assert (home / "flavor").read_text() == "cuda12.8\n"
    assert 'device = ["cuda:0"]' in (home / "config.toml").read_text()
    again = run_installer(env)
    assert "nothing to do" in again.stderr and len(log.read_text().splitlines()) == 1
    assert run_installer(env, "--uninstall").returncode == 0
    assert sorted(p.name for p in home.iterdir()) == ["config.toml"]
    assert store.is_dir()  # the link went, not what it pointed at


def test_nix_cannot_install_a_wheel(tmp_path: Path) -> None:
    wheel = tmp_path / "pie-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    env = installer_env(tmp_path, tool_dir(tmp_path, {"nix": FAKE_NIX}), PIE_HOME=str(tmp_path / "prefix"),
                        PIE_USE_NIX="1", PIE_SOURCE=str(wheel))
    result = run_installer(env)
    assert result.returncode == 1 and "set PIE_USE_NIX=0" in result.stderr


# --- a full offline install (one per module; the steps below run in file order) ------------------

@dataclass(frozen=True)
class Installation:
    home: Path
    env: dict[str, str]
    first: subprocess.CompletedProcess[str]
    user_files: dict[str, bytes]  # files the user had in PIE_HOME before installing


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of this checkout, built from a clean copy (no stale build/ folder gets in)."""
    root = tmp_path_factory.mktemp("wheel")
    clean_copy(root / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(root / "dist"),
                    str(root / "src")], check=True, capture_output=True, timeout=300)
    (built,) = (root / "dist").glob("pie-*.whl")
    return built


@pytest.fixture(scope="module")
def installation(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Installation:
    tmp_path = tmp_path_factory.mktemp("install")
    home = tmp_path / "pie-home"
    user_files = {"authorized_users.toml": b'[users.alice.keys]\nlaptop = "ssh-ed25519 AAAAC3Nz alice"\n',
                  "notes.txt": b"mine\n", "adapters/style.safetensors": b"\x00\x01weights"}
    for name, data in user_files.items():
        (home / name).parent.mkdir(parents=True, exist_ok=True)
        (home / name).write_bytes(data)
    pins = tmp_path / "pins.txt"
    pins.write_text("torch==2.13.0\n")  # the CPU wheel on this machine's disk
    env = installer_env(tmp_path, tool_dir(tmp_path), PIE_HOME=str(home), PIE_SOURCE=str(wheel),
                        PIE_USE_NIX="0", PIE_TORCH_INDEX_URL="", PIE_PIP_ARGS=f"--no-compile -c {pins}",
                        XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    return Installation(home, env, run_installer(env), user_files)


def test_install_creates_the_prefix(installation: Installation) -> None:
    home, first = installation.home, installation.first
    assert first.returncode == 0, first.stderr[-3000:]
    assert "flavor portable" in first.stderr  # no NVIDIA driver: detected as portable
    assert (home / "flavor").read_text() == "portable\n"
    assert os.access(home / "bin" / "pie", os.X_OK)
    assert f'export PATH="{home}/bin:$PATH"' in first.stderr  # PATH advice
    config = tomllib.loads((home / "config.toml").read_text())
    assert config["model"] == [{"hf_repo": "pie/tiny-random", "device": ["cpu"]}]
    for name, data in installation.user_files.items():
        assert (home / name).read_bytes() == data
    torch = subprocess.run([str(home / "venv" / "bin" / "python"), "-c", "import torch; print(torch.__version__)"],
                           capture_output=True, text=True, check=True)
    assert torch.stdout.strip() == "2.13.0+cpu"


def test_the_installed_package_knows_its_flavor(installation: Installation) -> None:
    """What `pie doctor` relies on: the wheel's flavor files and $PIE_HOME/flavor, outside a checkout."""
    code = ("from pie.flavors import default_flavors_dir, installed_flavor; "
            "print(installed_flavor().name, default_flavors_dir())")
    env = {"PIE_HOME": str(installation.home), "PATH": installation.env["PATH"]}
    result = subprocess.run([str(installation.home / "venv" / "bin" / "python"), "-c", code], env=env,
                            cwd=installation.home, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["portable", str(installation.home / "venv" / "share" / "pie" / "flavors")]


def test_a_second_run_is_a_no_op(installation: Installation) -> None:
    before = snapshot(installation.home)
    again = run_installer(installation.env, timeout=scaled(60))
    assert again.returncode == 0, again.stderr
    assert "already installed" in again.stderr and "nothing to do" in again.stderr
    assert snapshot(installation.home) == before


def test_a_reinstall_leaves_an_edited_config_byte_identical(installation: Installation) -> None:
    config = installation.home / "config.toml"
    edited = config.read_bytes().replace(b"port = 8080", b"port = 9123  # mine")
    config.write_bytes(edited)
    (installation.home / ".install-stamp").unlink()  # forces every install step to run again
    result = run_installer(installation.env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"keeping your {config}" in result.stderr
    assert config.read_bytes() == edited


@needs_cli
def test_the_installed_pie_runs(installation: Installation) -> None:
    env = {"PATH": installation.env["PATH"], "HOME": installation.env["HOME"]}
    result = subprocess.run([str(installation.home / "bin" / "pie"), "--help"], env=env, capture_output=True,
                            text=True, timeout=scaled(120), check=False)
    assert result.returncode == 0, result.stderr
    assert "serve" in result.stdout


@needs_cli
def test_pie_doctor_reports_the_flavor(installation: Installation) -> None:
    env = {"PATH": installation.env["PATH"], "HOME": installation.env["HOME"]}
    result = subprocess.run([str(installation.home / "bin" / "pie"), "doctor"], env=env, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode in (0, 1), result.stderr  # 1: it found something to fix (no GPU, no model)
    assert "portable" in result.stdout + result.stderr


def test_service_installs_a_user_unit_for_this_prefix(installation: Installation) -> None:
    result = run_installer(installation.env, "--service=user", timeout=scaled(60))
    assert result.returncode == 0, result.stderr
    unit = Path(installation.env["XDG_CONFIG_HOME"]) / "systemd" / "user" / "pie.service"
    text = unit.read_text()
    assert f"ExecStart={installation.home}/bin/pie serve --config {installation.home}/config.toml" in text
    assert f"Environment=PIE_HOME={installation.home}\n" in text and "%h/.pie" not in text
    assert "loginctl enable-linger" in result.stderr
    before = unit.stat().st_mtime_ns
    again = run_installer(installation.env, "--service=user", timeout=scaled(60))
    assert again.returncode == 0 and "is up to date" in again.stderr
    assert unit.stat().st_mtime_ns == before


def test_uninstall_removes_what_it_installed_and_nothing_else(installation: Installation) -> None:
    home = installation.home
    config = (home / "config.toml").read_bytes()
    result = run_installer(installation.env, "--uninstall", timeout=scaled(60))
    assert result.returncode == 0, result.stderr
    remaining = {str(p.relative_to(home)) for p in home.rglob("*") if p.is_file()}
    assert remaining == {*installation.user_files, "config.toml"}
    assert (home / "config.toml").read_bytes() == config
    for name, data in installation.user_files.items():
        assert (home / name).read_bytes() == data
    assert not (Path(installation.env["XDG_CONFIG_HOME"]) / "systemd" / "user" / "pie.service").exists()
    again = run_installer(installation.env, "--uninstall", timeout=scaled(60))
    assert again.returncode == 0 and "nothing to uninstall" in again.stderr
    purge = run_installer(installation.env, "--uninstall", "--purge", timeout=scaled(60))
    assert purge.returncode == 0
    assert {str(p.relative_to(home)) for p in home.rglob("*") if p.is_file()} == {
        "notes.txt", "adapters/style.safetensors"}


def test_snapshot_sees_changes(tmp_path: Path) -> None:
    """The no-op check above is only as good as the snapshot; it must notice a touched file."""
    (tmp_path / "f").write_text("a")
    before = snapshot(tmp_path)
    os.utime(tmp_path / "f", ns=(1, 1))
    assert snapshot(tmp_path) != before
    assert stat.S_ISREG(before["f"][0])
