"""systemd/pie.service (system) and systemd/pie-user.service (user): systemd-analyze accepts them, the
sandbox and stop timeout are what the docs promise, and the ExecStart line, run as written (only
systemd's specifiers substituted), starts a server that answers /health and stops on SIGTERM."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from serve_process import ServeProcess
from timing import scaled

REPO = Path(__file__).resolve().parent.parent
SYSTEM_UNIT = REPO / "systemd" / "pie.service"
USER_UNIT = REPO / "systemd" / "pie-user.service"
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # systemd's default PATH
NVIDIA_DEVICES = {"char-nvidiactl rw", "char-nvidia-frontend rw", "char-nvidia-uvm rw", "char-nvidia-caps rw"}
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed (Debian: apt-get install systemd)")
needs_cli = pytest.mark.skipif(not (REPO / "pie" / "cli" / "main.py").is_file(),
                               reason="pie.cli.main (`pie serve`) is not in this checkout yet")


@dataclass(frozen=True)
class Unit:
    entries: tuple[tuple[str, str, str], ...]  # (section, key, value) in file order

    @classmethod
    def read(cls, path: Path) -> Unit:
        entries, section = [], ""
        for line in path.read_text().replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            key, _, value = line.partition("=")
            entries.append((section, key.strip(), value.strip()))
        return cls(tuple(entries))

    def all(self, key: str, section: str = "Service") -> list[str]:
        return [v for s, k, v in self.entries if (s, k) == (section, key)]

    def one(self, key: str, section: str = "Service") -> str:
        values = self.all(key, section)
        assert values, f"[{section}] has no {key}="
        return values[-1]


def substitute(value: str, specifiers: dict[str, str]) -> str:
    """Replace systemd specifiers; one this test does not model fails it, so none goes unnoticed."""
    def one(match: re.Match[str]) -> str:
        assert match.group(0) in specifiers, f"the unit uses {match.group(0)}, which this test does not model"
        return specifiers[match.group(0)]

    return re.sub(r"%.", one, value)


def command_line(unit: Unit, specifiers: dict[str, str]) -> list[str]:
    return shlex.split(substitute(unit.one("ExecStart").lstrip("@-:+!"), specifiers))


def environment(unit: Unit, specifiers: dict[str, str]) -> dict[str, str]:
    env = {}
    for value in unit.all("Environment"):
        for assignment in shlex.split(substitute(value, specifiers)):
            key, _, val = assignment.partition("=")
            env[key] = val
    return env


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min)?", value)
    assert match, f"cannot read the time span {value!r}"
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


# --- systemd-analyze --------------------------------------------------------------------------------

def system_root(tmp_path: Path, unit_text: str) -> Path:
    """A scratch root with the host's unit library, the unit installed, and its ExecStart binary present
    (verify checks that the binary exists; on the host it would be /var/lib/pie/.pie/bin/pie)."""
    root = tmp_path / "root"
    library = Path("/usr/lib/systemd/system")
    library = library if library.is_dir() else Path("/lib/systemd/system")
    shutil.copytree(library, root / "usr/lib/systemd/system", symlinks=False, ignore_dangling_symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system/pie.service").write_text(unit_text)
    binary = root / command_line(Unit.read(SYSTEM_UNIT), {"%S": "/var/lib", "%h": "/root"})[0].lstrip("/")
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    return root


def analyze(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", f"--root={root}", "--man=no", "pie.service"],
                          capture_output=True, text=True, timeout=scaled(60), check=False)


@needs_analyze
def test_system_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    result = analyze(system_root(tmp_path, SYSTEM_UNIT.read_text()))
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@needs_analyze
def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelled key is reported, a missing binary is an error."""
    typo = analyze(system_root(tmp_path / "a", SYSTEM_UNIT.read_text().replace("PrivateTmp=", "PrivateTemp=")))
    assert "Unknown key 'PrivateTemp'" in typo.stderr
    text = SYSTEM_UNIT.read_text().replace("ExecStart=%S/pie/.pie/bin/pie", "ExecStart=%S/pie/.pie/bin/nopie")
    assert analyze(system_root(tmp_path / "b", text)).returncode != 0


@needs_analyze
def test_user_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    home, runtime = tmp_path / "home", tmp_path / "run"
    runtime.mkdir(mode=0o700)
    binary = Path(command_line(Unit.read(USER_UNIT), {"%h": str(home)})[0])
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}
    result = subprocess.run(["systemd-analyze", "--user", "verify", "--man=no", str(USER_UNIT)], env=env,
                            capture_output=True, text=True, timeout=scaled(60), check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


# --- what the units promise ----------------------------------------------------------------------------

def test_system_unit_runs_sandboxed_as_its_own_user() -> None:
    unit = Unit.read(SYSTEM_UNIT)
    expected = {"User": "pie", "Group": "pie", "StateDirectory": "pie", "NoNewPrivileges": "yes",
                "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "DevicePolicy": "closed",
                "Restart": "on-failure", "CapabilityBoundingSet": ""}
    assert {key: unit.one(key) for key in expected} == expected
    assert set(unit.all("DeviceAllow")) == NVIDIA_DEVICES
    assert not unit.all("PrivateDevices")  # it would hide /dev/nvidia*
    assert not unit.all("ReadWritePaths")  # StateDirectory is the one writable place
    assert unit.one("WantedBy", "Install") == "multi-user.target"


@pytest.mark.parametrize("path", [SYSTEM_UNIT, USER_UNIT], ids=["system", "user"])
def test_both_units_serve_the_users_pie_home_config(path: Path) -> None:
    specifiers = {"%S": "/var/lib", "%h": "/home/someone"}
    unit = Unit.read(path)
    pie_home = environment(unit, specifiers)["PIE_HOME"]
    assert command_line(unit, specifiers) == [f"{pie_home}/bin/pie", "serve", "--config", f"{pie_home}/config.toml"]
    assert pie_home == ("/var/lib/pie/.pie" if path == SYSTEM_UNIT else "/home/someone/.pie")


@pytest.mark.parametrize("path", [SYSTEM_UNIT, USER_UNIT], ids=["system", "user"])
def test_stop_timeout_covers_the_graceful_shutdown(path: Path) -> None:
    from pie.server.app import EXIT_INTERRUPTED, EXIT_STARTUP_FAILED, SETTLE_S
    from pie.server.options import ServerOptions

    unit = Unit.read(path)
    graceful = ServerOptions().shutdown_timeout_s + SETTLE_S
    assert seconds(unit.one("TimeoutStopSec")) >= graceful + 5  # margin for the runtime and engine to close
    assert unit.one("KillSignal") == "SIGTERM" and unit.one("KillMode") == "mixed"
    assert unit.one("SuccessExitStatus") == str(EXIT_INTERRUPTED)
    # A start that fails (exit EXIT_STARTUP_FAILED = 1, as for any error) is retried a bounded number of times.
    assert EXIT_STARTUP_FAILED == 1 and unit.one("Restart") == "on-failure"
    assert unit.one("StartLimitBurst", "Unit") == "3" and seconds(unit.one("StartLimitIntervalSec", "Unit")) >= 60


# --- ExecStart, run as written ------------------------------------------------------------------------

@needs_cli
@pytest.mark.parametrize("path", [SYSTEM_UNIT, USER_UNIT], ids=["system", "user"])
def test_exec_start_serves_health_and_stops_on_sigterm(tmp_path: Path, path: Path) -> None:
    unit = Unit.read(path)
    home = tmp_path / "home"
    specifiers = {"%h": str(home), "%S": str(tmp_path / "state")}
    argv, env = command_line(unit, specifiers), environment(unit, specifiers)
    pie_home = Path(env["PIE_HOME"])
    # pie installed where the unit expects it: this checkout's `pie` console script.
    (pie_home / "bin").mkdir(parents=True)
    (pie_home / "bin" / "pie").symlink_to(Path(sys.executable).parent / "pie")
    # Port 0: the server binds a free port itself and logs which (no port picked here can be taken meanwhile).
    (pie_home / "config.toml").write_text('host = "127.0.0.1"\nport = 0\n\n'
                                          '[[model]]\nhf_repo = "pie/tiny-random"\ndevice = ["cpu"]\n')
    workdir = Path(substitute(unit.one("WorkingDirectory"), specifiers)) if unit.all("WorkingDirectory") else home
    workdir.mkdir(parents=True, exist_ok=True)
    server = ServeProcess(argv, env={"PATH": SERVICE_PATH, "HOME": str(home), **env}, cwd=workdir, new_session=True)
    try:
        port = server.wait_serving(180)
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=scaled(10))
        assert health.status_code == 200 and isinstance(health.json(), dict)
        server.proc.send_signal(signal.SIGTERM)
        # systemd allows TimeoutStopSec; a loaded test machine gets the same stretch as every other deadline.
        status = server.wait(seconds(unit.one("TimeoutStopSec")))
        assert status in (0, int(unit.one("SuccessExitStatus"))), server.output()[-3000:]
    finally:
        server.kill()
