"""The sandbox process: `python -m pie.runtime.sandbox.child <fd>`, started by `pie.runtime.sandbox.server`.

It reads one `start` frame from the socket at `fd` (the program's files and manifest, the input, the
policy), imports everything the SDK needs, restricts itself (`guard.apply`), then runs the program
with the same runner as trusted mode but with a `RemoteHost`, and ends with one `done` frame.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import traceback
from pathlib import Path
from types import MappingProxyType
from typing import Any

# Imported before the guard: after it, reading files outside the Python installation is refused.
import llguidance
import numpy

import inferlet
import inferlet.grammar
from pie.errors import InferletError, PieError
from pie.runtime import runner
from pie.runtime.programs import Manifest, Program
from pie.runtime.sandbox import guard
from pie.runtime.sandbox.client import RemoteHost
from pie.runtime.sandbox.policy import SandboxPolicy
from pie.runtime.sandbox.wire import recv_frame

PRELOADED = (inferlet, llguidance, numpy)  # kept referenced: imported for their side effect above


def program_from(spec: dict[str, Any]) -> Program:
    manifest = Manifest(name=str(spec["name"]), version=str(spec["version"]), entry=str(spec["entry"]),
                        call=spec["call"])
    files = {str(k): bytes(v) for k, v in dict(spec["files"]).items()}
    return Program(manifest, "sandbox", uploaded=MappingProxyType(files))


def run(sock: socket.socket) -> int:
    start = recv_frame(sock)
    if start is None or start.get("t") != "start":
        return 2
    policy = SandboxPolicy.from_dict(start["policy"])
    loop = asyncio.new_event_loop()  # before the guard: the loop makes a socketpair for its wakeups
    asyncio.set_event_loop(loop)
    applied = guard.apply(policy, Path(start["scratch"]), str(start["username"]))
    host = RemoteHost(sock, loop)
    host.start()
    host.post({"t": "ready", "uid": applied.uid, "network": applied.network, "uid_note": applied.uid_note,
               "rlimits": applied.rlimits})

    def emit(kind: str, value: str | bytes) -> None:
        host.post({"t": "event", "k": kind, "v": value})

    try:
        result = loop.run_until_complete(runner.run_program(program_from(start["program"]), start["input"],
                                                            host, emit))
        host.post({"t": "done", "ok": True, "v": result})
    except InferletError as e:
        host.post({"t": "done", "ok": False, "v": str(e)})
    except PieError as e:
        host.post({"t": "done", "ok": False, "v": f"{type(e).__name__}: {e}"})
    except BaseException as e:  # the runner's own failure: report it rather than die silently
        host.post({"t": "done", "ok": False, "v": "".join(traceback.format_exception(e))[-8000:]})
    return 0


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    code = run(sock)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: the inferlet's leftovers (threads, tasks) do not matter


if __name__ == "__main__":
    main()
