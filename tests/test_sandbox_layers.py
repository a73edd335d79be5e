"""The sandbox layer probe, and what isolated mode does when a layer is missing: `pie serve` refuses
to start naming the layer and its fix, unless `[sandbox] allow_weaker`; `pie doctor` lists them.

A host without bubblewrap is made real by running the check in a child process whose PATH has no
`bwrap` (the probe looks it up there, as the server does)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from pie.runtime.sandbox import seccomp
from pie.runtime.sandbox.layers import probe

NAMES = ["bubblewrap", "user namespace, own uid", "mount namespace", "pid namespace", "network namespace",
         "no_new_privs", "seccomp", "resource limits"]


def without_bwrap(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": str(tmp_path / "empty-bin"), "PIE_HOME": str(tmp_path / "home")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=120)


def test_the_probe_names_every_layer_and_finds_them_where_bwrap_runs() -> None:
    layers = probe()
    assert [layer.name for layer in layers] == NAMES
    if layers[0].present:  # bubblewrap is here: the namespaces it makes must show inside the sandbox
        present = {layer.name for layer in layers if layer.present}
        assert {"mount namespace", "pid namespace", "network namespace", "no_new_privs"} <= present
    for layer in layers:
        assert layer.present or layer.fix, layer


def test_the_seccomp_filter_compiles_to_classic_bpf() -> None:
    program = seccomp.compiled()
    assert program and len(program) % 8 == 0  # struct sock_filter is 8 bytes
    fd = seccomp.filter_fd()
    try:
        assert os.read(fd, len(program) + 1) == program
    finally:
        os.close(fd)


def test_isolated_mode_refuses_to_start_without_a_layer_unless_allow_weaker(tmp_path: Path) -> None:
    result = without_bwrap("""
        import asyncio
        from pie.engine.config import EngineConfig
        from pie.errors import SandboxError
        from pie.runtime.runtime import ModelSpec, Runtime, RuntimeConfig
        from pie.runtime.sandbox import SandboxPolicy
        from pie.runtime.sandbox.layers import require

        config = RuntimeConfig((ModelSpec("m", EngineConfig(model="/nonexistent")),), sandbox=SandboxPolicy())
        try:
            asyncio.run(Runtime.start(config))  # refused before any model is loaded
        except SandboxError as e:
            print("refused:", e)
        print("weaker:", require(SandboxPolicy(allow_weaker=True)))
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    refused = result.stdout.splitlines()[0]
    assert refused.startswith("refused: isolated mode needs every layer"), result.stdout
    assert "bubblewrap: not found on PATH (fix: apt-get install bubblewrap)" in refused
    assert "allow_weaker = true" in refused
    assert "weaker: Mode(bwrap=False, seccomp=False)" in result.stdout
    assert "isolated mode runs with a weaker sandbox" in result.stderr  # logged once, as a warning


def test_doctor_lists_the_layers_and_fails_only_for_strict_isolated_mode(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    doctor = f"""
        from pathlib import Path
        from pie.doctor import _sandbox_layers
        for check in _sandbox_layers(Path({str(config)!r})):
            print(check.level, check.blocking, check.text)
    """
    config.write_text('[[model]]\nhf_repo = "pie/tiny-random"\n')
    trusted = without_bwrap(doctor, tmp_path).stdout
    assert "warn False sandbox layer bubblewrap missing (not used: isolation = trusted)" in trusted, trusted
    config.write_text('[runtime]\nisolation = "isolated"\n')
    strict = without_bwrap(doctor, tmp_path).stdout
    assert "fail True sandbox layer bubblewrap missing (isolated): not found on PATH; fix: apt-get install " \
           "bubblewrap, or set [sandbox] allow_weaker = true" in strict, strict
    config.write_text('[runtime]\nisolation = "isolated"\n[sandbox]\nallow_weaker = true\n')
    weaker = without_bwrap(doctor, tmp_path).stdout
    assert "warn False sandbox layer seccomp missing (isolated)" in weaker, weaker
