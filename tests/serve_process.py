"""`pie serve` as a child process, on the port it bound itself.

With `port = 0` in its config the server binds any free port and logs it ("pie serving on
ws://HOST:PORT/v1/ws"), so no test picks a port that another process could take before the
server binds it. The child's output (stdout and stderr together) is read on a thread: the port
is known as soon as that line appears, and the whole output is kept for the assertions after.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from pathlib import Path

from timing import scaled

SERVING = re.compile(r"pie serving on ws://(?P<host>\S+?):(?P<port>\d+)/")


class ServeProcess:
    """The server's process; `wait_serving` returns its port once it serves (the model loaded)."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path | None = None, *,
                 new_session: bool = False) -> None:
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=new_session)
        self.port: int | None = None
        self._new_session = new_session
        self._lines: list[str] = []
        self._seen = threading.Event()  # set at the serving line, or when the output ends without one
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.append(line)
            found = SERVING.search(line)
            if found and self.port is None:
                self.port = int(found["port"])
                self._seen.set()
        self._seen.set()

    def wait_serving(self, seconds: float) -> int:
        """The port, once the server logs that it serves; AssertionError with the output tail if it
        exits first or says nothing within scaled(`seconds`)."""
        if not self._seen.wait(scaled(seconds)):
            raise AssertionError(f"the server did not serve within {scaled(seconds):g} s:\n{self.output()[-3000:]}")
        if self.port is None:
            self.proc.wait(scaled(30))
            raise AssertionError(f"the server exited with {self.proc.returncode} before serving:\n"
                                 f"{self.output()[-3000:]}")
        return self.port

    def wait(self, seconds: float) -> int:
        """Its exit status, within scaled(`seconds`); the output is complete afterwards."""
        status = self.proc.wait(scaled(seconds))
        self._reader.join(scaled(30))
        return status

    def output(self) -> str:
        return "".join(self._lines)

    def kill(self) -> None:
        """Kill it (its process group when it has one of its own) if it still runs, and reap it."""
        if self.proc.poll() is None:
            if self._new_session:
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.kill()
        self.proc.wait()
        self._reader.join(scaled(30))
