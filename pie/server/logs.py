"""The server's logging: level and format (`pie serve --log-level`, `--log-format json`), the startup
banner, the access log (one line per HTTP request, logger `pie.access`), and weight-loading progress
(logger `pie.load`): log lines, or on a terminal one bar redrawn in place (`LoadBar`).

JSON lines carry `ts`, `level`, `logger`, `message`, plus the request fields of access lines (`method`,
`path`, `status`, `duration_ms`, `user`), so a log shipper needs no parsing rules.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ACCESS_FIELDS = ("method", "path", "status", "duration_ms", "user")

log = logging.getLogger("pie.server")
access = logging.getLogger("pie.access")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        line.update({k: getattr(record, k) for k in ACCESS_FIELDS if hasattr(record, k)})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class LoadBar(logging.Handler):
    """`pie.load` progress records (they carry `model`, `done`, `total`, `elapsed_s`) as one line
    redrawn in place, ended by a newline when the load completes."""

    WIDTH = 30

    def __init__(self, stream: TextIO) -> None:
        super().__init__(logging.INFO)
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        done, total = getattr(record, "done", None), getattr(record, "total", None)
        if not isinstance(done, int) or not isinstance(total, int):
            return
        filled = self.WIDTH * done // max(total, 1)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        self.stream.write(f"\rloading {getattr(record, 'model', '')} [{bar}] {done * 100 // max(total, 1):3d}% "
                          f"{done}/{total} tensors {float(getattr(record, 'elapsed_s', 0.0)):.1f} s")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def _not_load_steps(record: logging.LogRecord) -> bool:
    """On a terminal the bar shows the steps; the log keeps the final "loaded" line."""
    done, total = getattr(record, "done", None), getattr(record, "total", None)
    return record.name != "pie.load" or done is None or total is None or done >= total


def configure(level: str = "info", fmt: str = "text", *, terminal: bool | None = None) -> None:
    """Root logging for `pie serve` (replaces handlers set before, so a second call takes effect).
    `terminal` (default: whether stderr is one) draws the load progress as a bar instead of lines."""
    if level not in LOG_LEVELS:
        raise ValueError(f"log level {level!r}; use one of {', '.join(LOG_LEVELS)}")
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r}; use one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handlers: list[logging.Handler] = [handler]
    if terminal is None:
        terminal = sys.stderr.isatty()
    if terminal and fmt == "text":
        handler.addFilter(_not_load_steps)
        handlers.insert(0, LoadBar(sys.stderr))  # first: the finished bar's newline precedes the "loaded" line
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=handlers, force=True)


def access_line(method: str, path: str, status: int, duration_s: float, user: str | None) -> None:
    """One line per HTTP request; 5xx answers at error level so they are never missed."""
    level = logging.ERROR if status >= 500 else logging.INFO
    ms = round(duration_s * 1000, 1)
    access.log(level, "%s %s %d %.1f ms user=%s", method, path, status, ms, user or "-",
               extra={"method": method, "path": path, "status": status, "duration_ms": ms, "user": user})


def banner(runtime: Any, config: Any = None) -> None:
    """What is served, on what, with how much KV: one line per model (group 0's engine facts)."""
    model_of = getattr(runtime, "model", None)
    for status in runtime.models():
        groups = getattr(model_of(status.name), "groups", []) if model_of is not None else []
        if not groups:
            log.info("model %s (%s) on %s", status.name, status.model_type, status.device)
            continue
        info = groups[0].info
        graphs = _cuda_graphs(config, status.name)
        log.info("model %s (%s) from %s: device %s, dtype %s, attention %s, KV %d pages x %d tokens = %d tokens "
                 "per group, %d data-parallel group(s), tensor parallel %d, CUDA graphs %s",
                 status.name, info.model_type, info.model_dir, info.device, info.dtype, info.attention_backend,
                 info.num_pages, info.page_size, info.num_pages * info.page_size, len(groups),
                 info.tensor_parallel_size, "unknown" if graphs is None else ("on" if graphs else "off"))


def _cuda_graphs(config: Any, name: str) -> bool | None:
    """`use_cuda_graphs` of model `name` in a pie Config or a RuntimeConfig; None when neither says."""
    try:
        if hasattr(config, "model") and callable(config.model):
            return bool(config.model(name).engine_config().use_cuda_graphs)
        for spec in getattr(config, "models", ()):
            if getattr(spec, "name", None) == name:
                return bool(spec.engine.use_cuda_graphs)
    except Exception:
        return None
    return None
