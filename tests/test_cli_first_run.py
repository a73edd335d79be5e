"""What a new user meets first: help with its defaults, `--version`, `-h`, bare `pie`, `pie inferlet`,
inferlet arguments checked before anything loads, `--model`, `--stream` printing once, the offline
errors and `pie doctor`'s device, hub and cache checks."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from server_support import ServerThread
from typer.testing import CliRunner

import pie
from pie.cli.main import app, run_cli
from pie.cli.params import check_input, check_served_input
from pie.client.run import run_inferlet
from pie.errors import RequestError
from pie.runtime.programs import Manifest

ECHO_MAIN = "async def main(input: dict) -> str:\n    return str(sorted(input))\n"
ECHO_TOML = ('[package]\nname = "echo-keys"\nversion = "1.2.0"\ndescription = "Returns its input keys"\n'
             '[parameters]\nword = { type = "string", description = "any word" }\n'
             'count = { type = "int", optional = true, description = "how many" }\n')


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh PIE_HOME and Hugging Face cache, offline."""
    home = tmp_path / "pie-home"
    monkeypatch.setenv("PIE_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return home


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What `pie run` hands to the stack; nothing is started."""
    import pie.client.run

    calls: list[dict[str, Any]] = []

    def fake_run(config: Any, program: str | None, input: dict[str, Any], **kwargs: Any) -> int:
        calls.append({"config": config, "program": program, "input": input, **kwargs})
        return 0

    monkeypatch.setattr(pie.client.run, "run_inferlet", fake_run)
    return calls


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def write_config(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(text)


# -- help, version, bare pie ------------------------------------------------------------------------

def test_help_shows_defaults_and_h_is_help() -> None:
    serve = cli("serve", "--help")
    assert serve.exit_code == 0
    assert "[default: $PIE_HOME/config.toml" in serve.output and "default 8080]" in serve.output
    assert "--model" in serve.output
    assert cli("serve", "-h").output == serve.output
    init = cli("config", "init", "-h")
    assert init.exit_code == 0 and "[default: pie/tiny-random]" in init.output
    assert "[default: main]" in cli("model", "download", "-h").output


def test_version_and_bare_pie(capsys: pytest.CaptureFixture[str]) -> None:
    for flag in ("--version", "-V"):
        result = cli(flag)
        assert result.exit_code == 0 and result.output == f"pie {pie.__version__}\n"
    bare = cli()
    assert bare.exit_code == 0 and "Commands:" in bare.output and "inferlet" in bare.output
    assert run_cli([]) == 0 and "Commands:" in capsys.readouterr().out  # the console script's path
    group = cli("config")
    assert group.exit_code == 0 and "init" in group.output


# -- pie inferlet -----------------------------------------------------------------------------------

def test_inferlet_list_info_install_remove(home: Path, tmp_path: Path) -> None:
    listed = cli("inferlet", "list")
    assert listed.exit_code == 0
    assert any(line.startswith("text-completion@0.1.0") and "standard" in line for line in listed.output.splitlines())
    info = cli("inferlet", "info", "text-completion")
    assert info.exit_code == 0 and "--max-tokens (int, optional): tokens to generate at most" in info.output

    package = tmp_path / "src"
    package.mkdir()
    (package / "main.py").write_text(ECHO_MAIN)
    (package / "Pie.toml").write_text(ECHO_TOML)
    installed = cli("inferlet", "install", str(package))
    assert installed.exit_code == 0, installed.output
    assert (home / "inferlets" / "echo-keys" / "main.py").read_text() == ECHO_MAIN
    row = next(line for line in cli("inferlet", "list").output.splitlines() if line.startswith("echo-keys@1.2.0"))
    assert "installed" in row and "Returns its input keys" in row
    assert "--word (string): any word" in cli("inferlet", "info", "echo-keys@1.2.0").output
    again = cli("inferlet", "install", str(package))
    assert again.exit_code == 1 and "--force" in again.output
    assert cli("inferlet", "install", str(package), "--force").exit_code == 0

    script = tmp_path / "shout_it.py"
    script.write_text('"""Shouts."""\nasync def main(input):\n    return "HI"\n')
    assert cli("inferlet", "install", str(script)).exit_code == 0
    assert (home / "inferlets" / "shout_it.py").is_file()

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "main.py").write_text("def run(input):\n    return 1\n")
    (broken / "Pie.toml").write_text('[package]\nname = "broken"\nversion = "0.1.0"\n')
    refused = cli("inferlet", "install", str(broken))
    assert refused.exit_code == 1 and "defines no top-level function main()" in refused.output
    assert not (home / "inferlets" / "broken").exists()

    assert cli("inferlet", "remove", "echo-keys").exit_code == 0
    assert cli("inferlet", "remove", "shout-it").exit_code == 0
    assert sorted(p.name for p in (home / "inferlets").iterdir()) == []
    standard = cli("inferlet", "remove", "text-completion")
    assert standard.exit_code == 1 and "a standard inferlet" in standard.output
    assert "text-completion@0.1.0" in cli("inferlet", "list").output


# -- pie run: checked before anything loads ---------------------------------------------------------

@pytest.mark.parametrize(("words", "expected"), [
    (["no-such-inferlet", "--", "--prompt", "hi"], "no inferlet 'no-such-inferlet'; available: agent-mcp@0.1.0, agent-react@"),
    (["text-complete", "--", "--prompt", "hi"], "Did you mean 'text-completion'?"),
    (["text-completion", "--", "--prompt", "hi", "--max-token", "3"], "did you mean --max-tokens?"),
    (["text-completion", "--", "--prompt", "hi", "--max-tokens", "lots"], "--max-tokens takes an int, got 'lots'"),
    (["text-completion", "--", "--max-tokens", "3"], "text-completion@0.1.0 needs --prompt"),
    (["text-completion", "--", "--prompt"], "--prompt needs a value"),
    (["chat", "--stream"], "chat@0.1.0 has no parameter --stream"),
])
def test_run_checks_the_inferlet_and_its_arguments_first(home: Path, launches: list[dict[str, Any]],
                                                         words: list[str], expected: str) -> None:
    result = cli("run", "--model", "pie/tiny-random", *words)
    assert result.exit_code == 1
    assert expected in result.output
    if words[0] in ("text-completion", "chat"):
        assert f"the parameters of {words[0]}@0.1.0 are --" in result.output
    assert launches == []  # nothing was started


def test_run_model_overrides_the_config_and_values_get_their_types(home: Path,
                                                                   launches: list[dict[str, Any]]) -> None:
    write_config(home, '[[model]]\nhf_repo = "acme/elsewhere"\ndevice = ["cpu"]\n')
    result = cli("run", "text-completion", "--model", "pie/tiny-random", "--stream", "--", "--prompt", "42",
                 "--temperature", "1")
    assert result.exit_code == 0, result.output
    [call] = launches
    assert [(m.name, m.hf_repo, m.device) for m in call["config"].models] == [
        ("pie/tiny-random", "pie/tiny-random", ("cpu",))]
    assert call["input"] == {"prompt": "42", "temperature": 1.0, "stream": True}
    assert cli("run", "text-completion", "--model", "x", "--port", "1").exit_code == 1  # a server serves its own


def test_check_input_passes_positionals_and_undeclared_inferlets() -> None:
    manifest = Manifest.parse(ECHO_TOML, "test")
    assert check_input(manifest, {"_positional": ["a"], "count": 2}) == {"_positional": ["a"], "count": 2}
    with pytest.raises(RequestError, match="--count was given 2 times"):
        check_input(manifest, {"word": "w", "count": [1, 2]})
    bare = Manifest.parse('[package]\nname = "any"\nversion = "0.0.1"\n', "test")
    assert check_input(bare, {"whatever": True}) == {"whatever": True}


def test_offline_unknown_model_fails_before_loading_and_says_what_to_do(home: Path,
                                                                       launches: list[dict[str, Any]]) -> None:
    for args in (["run", "text-completion", "--", "--prompt", "hi"], ["model", "download", "Qwen/Qwen3-0.6B"]):
        result = cli(*args)
        assert result.exit_code == 1
        message = result.output
        for advice in ("--model pie/tiny-random", "HF_HUB_OFFLINE=1", "HF_ENDPOINT", "hf download Qwen/Qwen3-0.6B",
                       "checkpoint folder"):
            assert advice in message, (advice, message)
        assert "huggingface-cli" not in message
        assert ("pie model download" in message) == (args[0] == "run")  # never advised by the command itself
    assert launches == []


def test_serve_model_override(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pie.server.app

    served: list[Any] = []
    monkeypatch.setattr(pie.server.app, "run_server", lambda config, **kw: served.append(config) or 0)
    assert cli("serve", "--model", "pie/tiny-random", "--port", "0").exit_code == 0
    assert [m.hf_repo for m in served[0].models] == ["pie/tiny-random"]
    refused = cli("serve")  # the built-in default, Qwen/Qwen3-0.6B, is not cached and the hub is off
    assert refused.exit_code == 1 and "--model pie/tiny-random" in refused.output and len(served) == 1


# -- --stream prints the text once --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PIE_HOME", str(tmp_path_factory.mktemp("pie-home")))
        with ServerThread() as server:
            yield server


def test_stream_prints_the_text_once(tiny_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    args = {"prompt": "Say hi", "max_tokens": 6}
    assert run_inferlet(None, "text-completion", args, server_url=tiny_server.url) == 0
    whole = capsys.readouterr().out
    assert run_inferlet(None, "text-completion", {**args, "stream": True}, server_url=tiny_server.url) == 0
    streamed = capsys.readouterr().out
    assert whole.strip() and streamed == whole  # the same text, once, ending in one newline


def test_run_against_a_server_checks_arguments_with_its_program_list(tiny_server: Any,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    bad = {"prompt": "hi", "max_token": 3}
    assert run_inferlet(None, "text-completion", bad, server_url=tiny_server.url, check=check_served_input) == 1
    assert "did you mean --max-tokens?" in capsys.readouterr().err
    assert check_served_input([], "not-listed", {"x": 1}) == {"x": 1}  # the server refuses it itself


# -- pie doctor ---------------------------------------------------------------------------------------

@pytest.mark.skipif("torch" in sys.modules and __import__("torch").cuda.is_available(), reason="needs a CPU-only machine")
def test_doctor_fails_on_a_cuda_device_without_cuda(home: Path) -> None:
    write_config(home, '[[model]]\nhf_repo = "pie/tiny-random"\ndevice = ["cuda:0"]\n')
    result = cli("doctor")
    assert result.exit_code == 1
    assert "fail  model pie/tiny-random: device cuda:0 is configured but this machine has no CUDA device" \
        in result.output
    assert "pie config set model.0.device '[\"cpu\"]'" in result.output


def test_doctor_reports_hub_and_cache(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(home, '[[model]]\nhf_repo = "acme/not-cached"\ndevice = ["cpu"]\n')
    offline = cli("doctor")
    assert offline.exit_code == 1, offline.output  # not cached and no hub: `pie serve` could not start
    assert "  ok  HF_HUB_OFFLINE is set" in offline.output and "Hugging Face cache " in offline.output
    assert "fail  model 'acme/not-cached' is not in the Hugging Face cache" in offline.output

    monkeypatch.delenv("HF_HUB_OFFLINE")
    with socket.create_server(("127.0.0.1", 0)) as hub:  # a reachable "hub": accepting is all the probe asks
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.getsockname()[1]}")
        online = cli("doctor")
    assert online.exit_code == 0, online.output
    assert "reachable" in online.output and "warn  model acme/not-cached is not in the cache" in online.output

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")  # nothing listens on port 1
    unreachable = cli("doctor")
    assert unreachable.exit_code == 1 and "warn  offline: cannot reach 127.0.0.1:1" in unreachable.output
