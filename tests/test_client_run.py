"""`pie run` (`run_inferlet`): the in-process stack for one run, and `--server` against a running one."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_support import ServerThread, tiny_runtime_config

from pie.client.run import run_inferlet
from pie.server.app import Server

LOCAL_INFERLET = '''
from inferlet import Model, session

async def main(input: dict) -> str:
    model = Model.load("")
    print("tokens:", len(model.tokenizer().encode(input["text"])))
    session.send("halfway")
    return input["text"][::-1]
'''


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with ServerThread() as server:
        yield server


def test_runs_text_completion_in_process_and_prints_its_text(capsys: pytest.CaptureFixture[str]) -> None:
    code = run_inferlet(tiny_runtime_config(), "text-completion", {"prompt": "Say hi", "max_tokens": 6})
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip(), "the completion text is printed"


def test_runs_a_local_inferlet_folder_against_a_server(server: Server, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "main.py").write_text(LOCAL_INFERLET)
    (tmp_path / "Pie.toml").write_text('[package]\nname = "reverse"\nversion = "0.3.0"\n')
    code = run_inferlet(None, None, {"text": "pie run"}, server_url=server.url, path=tmp_path)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.splitlines() == [out.splitlines()[0], "halfway", "nur eip"]
    assert out.startswith("tokens: ")


def test_a_single_script_runs_as_its_own_package(server: Server, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "shout_it.py"
    script.write_text("async def main(input):\n    return input['w'].upper()\n")
    assert run_inferlet(None, None, '{"w": "quiet"}', server_url=server.url, path=script) == 0
    assert capsys.readouterr().out == "QUIET\n"


def test_failures_exit_1_with_the_reason_on_stderr(server: Server, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert run_inferlet(None, "no-such-inferlet", {}, server_url=server.url) == 1
    assert "unknown inferlet 'no-such-inferlet'" in capsys.readouterr().err
    script = tmp_path / "boom.py"
    script.write_text("def main(input):\n    raise RuntimeError('the inferlet broke')\n")
    assert run_inferlet(None, None, {}, server_url=server.url, path=script) == 1
    assert "the inferlet broke" in capsys.readouterr().err
    assert run_inferlet(None, "text-completion", {}, server_url="ws://127.0.0.1:9") == 1
    assert "cannot connect" in capsys.readouterr().err


def test_ctrl_c_terminates_the_inferlet_and_exits_130(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        code = run_inferlet(None, "chat", {}, server_url=server.url)  # waits for messages forever
    finally:
        timer.cancel()
    assert code == 130
    assert "interrupted: terminating process" in capsys.readouterr().err
    assert server.state is not None
    chats = [p for p in server.state.runtime.processes() if p.program.startswith("chat@")]
    assert chats and all(p.status == "terminated" for p in chats)
