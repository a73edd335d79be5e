"""`[runtime] isolation = "auto"` (the default): isolated when enable_auth is on and more than one user is
authorized; an explicit "trusted" there runs, with a warning."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from pie.auth import add_key, keystore_path
from pie.config import Config, parse_config
from pie.runtime.isolation import effective_isolation
from pie.runtime.runtime import Runtime
from pie.tiny_model import ensure_tiny_model

WHOAMI = "import os\n\ndef main(input):\n    return {'pid': os.getpid()}\n"


def authorize(home: Path, *users: str) -> None:
    for user in users:
        public = ed25519.Ed25519PrivateKey.generate().public_key()
        line = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
        add_key(keystore_path(home), user, line, "laptop")


def config(home: Path, auth: bool, runtime: dict[str, Any] | None = None) -> Config:
    data: dict[str, Any] = {"enable_auth": auth, "runtime": runtime or {},
                            "model": [{"hf_repo": "pie/tiny-random", "device": ["cpu"], "max_num_kv_pages": 64}]}
    return parse_config(data, source=None, home=home)


@pytest.mark.parametrize(("users", "auth", "expected"), [
    (("alice", "bob"), True, "isolated"),
    (("alice",), True, "trusted"),
    (("alice", "bob"), False, "trusted"),  # auth off: one anonymous tenant
])
def test_auto_is_isolated_with_auth_and_several_users(tmp_path: Path, users: tuple[str, ...], auth: bool,
                                                      expected: str) -> None:
    authorize(tmp_path, *users)
    assert effective_isolation(config(tmp_path, auth)) == expected


def test_explicit_trusted_with_several_users_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    authorize(tmp_path, "alice", "bob")
    with caplog.at_level(logging.WARNING, logger="pie.runtime.isolation"):
        assert effective_isolation(config(tmp_path, True, {"isolation": "trusted"})) == "trusted"
    assert 'isolation = "trusted" with authentication on and 2 users authorized' in caplog.text


async def test_a_two_user_server_runs_inferlets_out_of_process(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIE_HOME", str(tmp_path))  # where pie/tiny-random is looked up
    ensure_tiny_model(tmp_path)
    authorize(tmp_path, "alice", "bob")
    programs = tmp_path / "programs" / "whoami"
    programs.mkdir(parents=True)
    (programs / "Pie.toml").write_text('[package]\nname = "whoami"\nversion = "0.1.0"\n')
    (programs / "main.py").write_text(WHOAMI)
    cfg = config(tmp_path, True, {"inferlet_paths": [str(programs.parent)]})
    runtime = await Runtime.start(cfg)
    try:
        assert runtime.sandbox is not None
        final = await (await runtime.launch("whoami", "{}", username="alice")).wait()
        assert final.kind == "return", final.value
        assert json.loads(final.value)["pid"] != os.getpid()  # a sandbox process, not the server's
    finally:
        await runtime.shutdown(0)
