"""The sandbox process: `python -m pie.runtime.sandbox.child <fd> [--uid N]`, started by
`pie.runtime.sandbox.server` (under bubblewrap, `pie.runtime.sandbox.bwrap`, or directly in the weaker
mode).

With `--uid N` (bubblewrap started by root) it first becomes uid/gid N with no groups: bwrap left it
CAP_SETUID/CAP_SETGID for that alone, and the switch clears every capability. Then it reads one `start` frame from the socket at `fd` (the program's files and manifest, the input, the
policy), imports everything the SDK needs, restricts itself (`guard.apply`), then runs the program
with the same runner as trusted mode but with a `RemoteHost`, and ends with one `done` frame.
"""

from __future__ import annotations

import os
import sys


def become(uid: int) -> None:
    """Switch to `uid`/`uid` for good (real, effective and saved ids) and check no capability is left."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    with open("/proc/self/status") as f:
        caps = {k: v.strip() for k, _, v in (line.partition(":") for line in f) if k.startswith("Cap")}
    if int(caps.get("CapEff", "1"), 16) or int(caps.get("CapPrm", "1"), 16):
        raise SystemExit(f"sandbox: capabilities left after switching to uid {uid}: {caps}")


# Before anything else is imported: the code below runs as the sandbox's own unprivileged user.
if __name__ == "__main__" and "--uid" in sys.argv:
    become(int(sys.argv[sys.argv.index("--uid") + 1]))

import asyncio  # noqa: E402
import socket  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from types import MappingProxyType  # noqa: E402
from typing import Any  # noqa: E402

# Imported before the guard: after it, reading files outside the Python installation is refused.
import llguidance  # noqa: E402
import numpy  # noqa: E402

import inferlet  # noqa: E402
import inferlet.grammar  # noqa: E402
from pie.errors import InferletError, PieError  # noqa: E402
from pie.runtime import runner  # noqa: E402
from pie.runtime.programs import Manifest, Program  # noqa: E402
from pie.runtime.sandbox import guard  # noqa: E402
from pie.runtime.sandbox.client import RemoteHost  # noqa: E402
from pie.runtime.sandbox.policy import SandboxPolicy  # noqa: E402
from pie.runtime.sandbox.wire import recv_frame  # noqa: E402

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
    paths = [str(p) for p in start.get("paths") or []]  # the program's installed dependencies
    sys.path.extend(p for p in paths if p not in sys.path)
    applied = guard.apply(policy, Path(start["scratch"]), str(start["username"]), os_sandbox=bool(start.get("os")),
                          own_uid=bool(start.get("own_uid")), readable=paths)
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
