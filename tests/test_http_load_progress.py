"""`pie serve` shows the weight load's progress before it listens: log lines when its output is a
pipe (a real `pie serve`), a bar redrawn in place when it is a terminal (the handlers it installs)."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import sys
from pathlib import Path

from serve_process import SERVING, ServeProcess

from pie.runtime.engine_client import log_load_progress
from pie.server.logs import LoadBar, _not_load_steps

PIE = str(Path(sys.executable).parent / "pie")
ARGV = [PIE, "serve", "--model", "pie/tiny-random", "--no-auth"]


def _home(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "config.toml").write_text("port = 0\n")  # the server binds a free port and logs it
    return {**os.environ, "PIE_HOME": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[1])}


def test_piped_output_logs_progress_lines_before_serving(tmp_path: Path) -> None:
    server = ServeProcess(ARGV, env=_home(tmp_path))
    try:
        server.wait_serving(180)
        server.proc.send_signal(signal.SIGINT)
        assert server.wait(60) == 0
    finally:
        server.kill()
    lines = server.output().splitlines()
    serving = next(i for i, line in enumerate(lines) if SERVING.search(line))
    loading = [i for i, line in enumerate(lines) if re.search(r"pie\.load: loading pie/tiny-random: \d+/\d+ tensors",
                                                               line)]
    loaded = [i for i, line in enumerate(lines) if "pie.load: loaded pie/tiny-random" in line]
    assert loading and loaded and loading[0] < loaded[0] < serving
    assert "\r" not in server.output()  # no bar in a log file


def test_terminal_bar_replaces_the_step_lines() -> None:
    """What `configure(terminal=True)` installs, fed by the engine's own progress callback."""
    bar_out, log_out = io.StringIO(), io.StringIO()
    lines = logging.StreamHandler(log_out)
    lines.addFilter(_not_load_steps)
    bar = LoadBar(bar_out)
    load = logging.getLogger("pie.load")
    level, load.level = load.level, logging.INFO
    load.addHandler(bar)
    load.addHandler(lines)
    try:
        progress = log_load_progress("m", every_s=0.0)
        for done in range(1, 11):
            progress(done, 10)
    finally:
        load.removeHandler(bar)
        load.removeHandler(lines)
        load.level = level
    frames = bar_out.getvalue().split("\r")[1:]
    assert len(frames) == 10 and frames[0].startswith("loading m [###...") and " 10% 1/10 tensors" in frames[0]
    assert frames[-1].startswith("loading m [" + "#" * LoadBar.WIDTH + "] 100% 10/10") and frames[-1].endswith("\n")
    assert log_out.getvalue().splitlines() == [log_out.getvalue().splitlines()[0]]  # the one "loaded" line
    assert log_out.getvalue().startswith("loaded m: 10 tensors in ")
