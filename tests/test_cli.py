"""The `pie` command: help everywhere, exit codes, one-line errors, `config`, `auth`, and how `serve` and
`run` hand their flags and arguments over (CliRunner); then real `pie` processes (console script)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_process import ServeProcess
from timing import scaled
from typer.testing import CliRunner

from pie.cli.main import app

PIE = str(Path(sys.executable).parent / "pie")
TINY_CONFIG = '[[model]]\nhf_repo = "pie/tiny-random"\ndevice = ["cpu"]\n'


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "pie-home"
    monkeypatch.setenv("PIE_HOME", str(home))
    return home


def cli(*args: str, input: str | None = None) -> Any:
    return CliRunner().invoke(app, list(args), input=input)


def command_paths(command: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield prefix
    for name, sub in getattr(command, "commands", {}).items():
        yield from command_paths(sub, (*prefix, name))


def test_every_command_has_help() -> None:
    import typer.main

    paths = list(command_paths(typer.main.get_command(app)))
    assert {("serve",), ("run",), ("doctor",), ("config", "set"), ("model", "add"), ("auth", "remove"),
            ("driver", "dev", "set", "venv")} <= set(paths)
    for path in paths:
        result = cli(*path, "--help")
        assert result.exit_code == 0, (path, result.output)
        assert "Usage: pie" in result.output


def test_usage_errors_exit_1_with_usage() -> None:
    for args in (["bogus"], ["config", "validate", "--bogus"], ["run", "text-completion", "--prompt", "hi"]):
        result = cli(*args)
        assert result.exit_code == 1, args
        assert "Error: No such" in result.output and "Try 'pie" in result.output


def test_config_errors_are_one_line_without_traceback_unless_debug(home: Path) -> None:
    home.mkdir()
    (home / "config.toml").write_text("[[model]]\nkv_page_size = 0\n")
    result = cli("config", "validate")
    assert result.exit_code == 1
    assert result.output == (f"error: {home / 'config.toml'}: model[0].kv_page_size = 0 is below the minimum 1; "
                             "use 1 or more (the default is 16)\n")
    debug = cli("--debug", "config", "validate")
    assert debug.exit_code == 1 and "Traceback" in debug.output and "ConfigError" in debug.output


def test_config_init_show_set_validate(home: Path) -> None:
    path = home / "config.toml"
    assert cli("config", "validate").output.startswith("ok: no config file (built-in defaults): 1 model(s)")
    result = cli("config", "init")  # device: what this machine has (cpu here)
    assert result.exit_code == 0 and result.output == f"wrote {path}\n"
    assert tomllib.loads(path.read_text())["model"] == [{"hf_repo": "pie/tiny-random", "device": ["cpu"]}]
    assert cli("config", "set", "model.0.hf_repo", "pie/tiny-random").exit_code == 0
    assert cli("config", "set", "port", "9123").output == f"set port in {path}\n"
    refused = cli("config", "set", "model.0.kv_page_size", "-1")
    assert refused.exit_code == 1 and "model[0].kv_page_size = -1 is below the minimum 1" in refused.output
    shown = cli("config", "show")
    assert shown.exit_code == 0 and shown.output.startswith(f"# effective configuration from {path}\n")
    effective = tomllib.loads(shown.output)
    assert effective["port"] == 9123 and effective["model"][0]["hf_repo"] == "pie/tiny-random"
    assert effective["model"][0]["driver"]["options"]["kv_page_size"] == 16
    validated = cli("config", "validate")
    assert validated.output == f"ok: {path}: 1 model(s) (pie/tiny-random), 127.0.0.1:9123, auth off\n"


def test_config_init_never_overwrites_without_asking(home: Path) -> None:
    path = home / "config.toml"
    assert cli("config", "init", "--device", "cuda:1").exit_code == 0
    before = path.read_text()
    declined = cli("config", "init", "--device", "cpu", input="n\n")
    assert declined.exit_code == 1 and "kept" in declined.output and path.read_text() == before
    assert cli("config", "init", "--device", "cpu").exit_code == 1  # no answer is no
    assert cli("config", "init", "--device", "cpu", input="y\n").exit_code == 0
    assert '"cpu"' in path.read_text()
    assert cli("config", "init", "--device", "mps", "--force").exit_code == 0
    assert '"mps"' in path.read_text()


def test_serve_hands_the_config_with_overrides_to_the_server(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server entry point is another module's; here only what `pie serve` passes it is checked
    (the real server runs in test_serve_with_auth_and_run_against_it)."""
    import pie.server.app

    calls: list[tuple[Any, bool, bool]] = []

    def fake_server(config: Any, *, debug: bool, monitor: bool) -> int:
        calls.append((config, debug, monitor))
        return 3

    monkeypatch.setattr(pie.server.app, "run_server", fake_server)
    home.mkdir()
    (home / "config.toml").write_text('port = 9000\nenable_auth = true\n' + TINY_CONFIG)
    result = cli("serve", "--host", "0.0.0.0", "--no-auth", "--debug", "-m")
    assert result.exit_code == 3  # the server's exit code is pie's
    config, debug, monitor = calls[0]
    assert (config.host, config.port, config.enable_auth, debug, monitor) == ("0.0.0.0", 9000, False, True, True)
    assert cli("serve", "--port", "9001").exit_code == 3 and calls[1][0].port == 9001 and calls[1][0].enable_auth
    assert cli("serve", "--port", "99999").exit_code == 1 and len(calls) == 2  # refused before serving


def test_run_folds_arguments_and_picks_the_server(home: Path, monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    import pie.client.run

    calls: list[dict[str, Any]] = []

    def fake_run(config: Any, program: str | None, input: dict[str, Any], **kwargs: Any) -> int:
        calls.append({"program": program, "input": input, **kwargs})
        return 0

    monkeypatch.setattr(pie.client.run, "run_inferlet", fake_run)
    home.mkdir()  # a model that needs no network: `pie run` checks it is obtainable before starting
    (home / "config.toml").write_text(TINY_CONFIG)
    assert cli("run", "text-completion@0.1.0", "--", "hi", "--max-tokens", "64", "--stream").exit_code == 0
    assert calls[-1]["program"] == "text-completion@0.1.0" and calls[-1]["server_url"] is None
    assert calls[-1]["input"] == {"max_tokens": 64, "stream": True, "_positional": ["hi"]}
    assert cli("run", "chat", "--port", "9000").exit_code == 0
    assert calls[-1]["server_url"] == "ws://127.0.0.1:9000/v1/ws" and calls[-1]["input"] == {}
    script = tmp_path / "x.py"
    assert cli("run", "-p", str(script), "-m", str(tmp_path / "Pie.toml"), "--", "--n", "1").exit_code == 0
    assert (calls[-1]["program"], calls[-1]["path"], calls[-1]["manifest"], calls[-1]["input"]) == \
        (None, script, tmp_path / "Pie.toml", {"n": 1})
    assert cli("run", "chat", "--port", "1", "--server", "ws://h:2/v1/ws").exit_code == 1
    assert cli("run").exit_code == 1 and len(calls) == 3


def test_auth_add_list_remove(home: Path, tmp_path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "id")], check=True)
    public = (tmp_path / "id.pub").read_text()
    added = cli("auth", "add", "alice", "laptop", input=public)
    assert added.exit_code == 0 and added.output.startswith("added key 'laptop' (ed25519, SHA256:")
    assert cli("auth", "add", "alice", "again", input=public).exit_code == 1
    private = cli("auth", "add", "bob", input=(tmp_path / "id").read_text())
    assert private.exit_code == 1 and "this is a private key" in private.output
    listed = cli("auth", "list").output.splitlines()
    assert listed[0] == f"# {home / 'authorized_users.toml'}" and listed[1] == "alice"
    assert listed[2].split()[:2] == ["laptop", "ed25519"]
    declined = cli("auth", "remove", "alice", input="n\n")
    assert declined.exit_code == 1 and "kept user 'alice'" in declined.output
    assert cli("auth", "remove", "alice", input="y\n").exit_code == 0
    assert cli("auth", "list").output.startswith("no users in")


# -- real processes ------------------------------------------------------------------------------------

def pie(*args: str, home: Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PIE, *args], env={**os.environ, "PIE_HOME": str(home)}, capture_output=True, text=True,
                          timeout=scaled(120), **kwargs)


def test_the_console_script(tmp_path: Path) -> None:
    assert pie("--help", home=tmp_path).returncode == 0
    (tmp_path / "config.toml").write_text(TINY_CONFIG)
    ok = pie("config", "validate", home=tmp_path)
    assert ok.returncode == 0 and ok.stdout.startswith(f"ok: {tmp_path / 'config.toml'}")
    (tmp_path / "config.toml").write_text("[[model]]\ntensor_parallel_size = 3\n")
    bad = pie("config", "validate", home=tmp_path)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "tensor_parallel_size = 3 does not divide the 1 device(s)" in bad.stderr


ECHO_INFERLET = '''
import asyncio, json

async def main(input: dict) -> str:
    if input.get("wait"):
        print("waiting", flush=True)
        await asyncio.sleep(120)
    return json.dumps(input, sort_keys=True)
'''


@pytest.mark.asyncio
async def test_serve_with_auth_and_run_against_it(tmp_path: Path) -> None:
    """`pie auth add` writes the keystore; `pie serve` with enable_auth reads it; a key gets in, through
    our client and through `pie run --port` (arguments folded, Ctrl-C = 130)."""
    from pie.client import PieClient
    from pie.client.signing import load_private_key
    from pie.errors import AuthError

    (tmp_path / "config.toml").write_text("port = 0\nenable_auth = true\n" + TINY_CONFIG)  # the server picks one
    nobody = pie("serve", home=tmp_path)  # auth on, no users: refused at startup, before loading a model
    assert nobody.returncode == 1 and "authorizes nobody" in nobody.stderr
    key = tmp_path / "home" / ".ssh" / "id_ed25519"  # where `pie run` looks for the user's key
    key.parent.mkdir(parents=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    with open(key.with_suffix(".pub")) as public:
        assert pie("auth", "add", "alice", home=tmp_path, stdin=public).returncode == 0
    server = ServeProcess([PIE, "serve"], env={**os.environ, "PIE_HOME": str(tmp_path)})
    try:
        port = server.wait_serving(120)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=scaled(10)).status_code == 200
        async with PieClient(f"ws://127.0.0.1:{port}/v1/ws") as client:
            await client.authenticate("alice", key=load_private_key(key))
            assert await client.list_processes() == []
        async with PieClient(f"ws://127.0.0.1:{port}/v1/ws") as client:
            with pytest.raises(AuthError, match="not authorized"):
                await client.authenticate("mallory", key=load_private_key(key))
        run_as_alice(tmp_path, port)
        server.proc.send_signal(signal.SIGINT)
        assert server.wait(60) == 0
    finally:
        server.kill()
    assert "auth on" in server.output()


def run_as_alice(tmp_path: Path, port: int) -> None:
    script = tmp_path / "echo_input.py"
    script.write_text(ECHO_INFERLET)
    env = {**os.environ, "PIE_HOME": str(tmp_path), "HOME": str(tmp_path / "home"), "USER": "alice",
           "LOGNAME": "alice"}
    args = [PIE, "run", "--port", str(port)]
    done = subprocess.run([*args, "-p", str(script), "--", "--max-tokens", "64", "--greedy", "-k", "v", "hello"],
                          env=env, capture_output=True, text=True, timeout=scaled(60))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == '{"_positional": ["hello"], "greedy": true, "k": "v", "max_tokens": 64}'
    missing = subprocess.run([*args, "no-such-inferlet"], env=env, capture_output=True, text=True,
                             timeout=scaled(60))
    assert missing.returncode == 1 and "no-such-inferlet" in missing.stderr
    waiting = subprocess.Popen([*args, "-p", str(script), "--", "--wait"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert waiting.stdout is not None and waiting.stdout.readline() == "waiting\n"
        waiting.send_signal(signal.SIGINT)
        assert waiting.wait(timeout=scaled(60)) == 130
    finally:
        waiting.kill()
        waiting.wait()


