"""`pie serve` as a subprocess for the robustness benchmarks (fuzz_protocol.py, soak.py).

The server binds 127.0.0.1 port 0 itself; the port is read from its log line
("pie serving on ws://127.0.0.1:PORT/v1/ws"). Its home (config, tiny model,
log) is a temporary folder. `rss_mib()` reads the server's resident memory
from /proc, `pages_used()` the KV pages in use from /metrics, `log_counts()`
the tracebacks and internal errors in its log.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

_SERVING = re.compile(rb"pie serving on ws://127\.0\.0\.1:(\d+)/v1/ws")
_PAGES = re.compile(r"^pie_kv_pages_used\{[^}]*\} (\d+(?:\.\d+)?)$", re.M)


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `wanted` (children inherit it); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, wanted), hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


class ServeProcess:
    def __init__(self, model: str = "pie/tiny-random", device: str = "cpu", server_toml: str = "") -> None:
        self.home = Path(tempfile.mkdtemp(prefix="pie-bench-"))
        config = self.home / "config.toml"
        config.write_text(f'host = "127.0.0.1"\nport = 0\n\n[server]\n{server_toml}\n\n'
                          f'[[model]]\nhf_repo = "{model}"\ndevice = ["{device}"]\n')
        self.log_path = self.home / "serve.log"
        log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the server
        env = {**os.environ, "PIE_HOME": str(self.home)}
        self.proc = subprocess.Popen([sys.executable, "-c", "from pie.cli.main import main; main()", "serve",
                                      "-c", str(config)], env=env, stdout=log, stderr=subprocess.STDOUT)
        self.port = self._wait_for_port()
        self.url = f"ws://127.0.0.1:{self.port}/v1/ws"
        self.http_url = f"http://127.0.0.1:{self.port}"
        self._wait_healthy()

    def _wait_for_port(self, timeout_s: float = 300.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = _SERVING.search(self.log_path.read_bytes())
            if found:
                return int(found.group(1))
            if self.proc.poll() is not None:
                raise SystemExit(f"pie serve exited with {self.proc.returncode}; see {self.log_path}")
            time.sleep(0.2)
        self.proc.kill()
        raise SystemExit(f"pie serve did not start in {timeout_s:g} s; see {self.log_path}")

    def _wait_healthy(self) -> None:
        for _ in range(100):
            try:
                if httpx.get(self.http_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"pie serve on port {self.port} does not answer /health; see {self.log_path}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def pages_used(self) -> int:
        text = httpx.get(self.http_url + "/metrics", timeout=10).text
        return int(sum(float(v) for v in _PAGES.findall(text)))

    def log_counts(self) -> dict[str, int]:
        text = self.log_path.read_bytes().decode("utf-8", errors="replace")
        return {"tracebacks": text.count("Traceback (most recent call last)"),
                "internal_errors": text.count("internal error"), "recursion_errors": text.count("RecursionError"),
                "log_bytes": len(text.encode())}

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)
