"""`pie serve`: the server's lifecycle around the runtime and the HTTP/WebSocket front.

Phases, as in uvicorn: `startup` (runtime, auth, bind, accept), `main_loop`
(serve until asked to stop), `shutdown`:

1. stop accepting connections and launches;
2. graceful: running inferlets may finish within `shutdown_timeout_s`
   (clients keep receiving their events);
3. forced: the runtime cancels what is left and frees its pages;
4. close client connections (1001) and cancel the server's own tasks.

The first SIGINT/SIGTERM starts the shutdown; a second one skips the
graceful phase. Exit codes (the operator spec's): 0 after a shutdown,
`EXIT_STARTUP_FAILED` (1) when startup fails (bad model, port in use, ...),
130 when a second signal forced the shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, cast

from aiohttp import web

from pie import telemetry
from pie.errors import PieError
from pie.runtime.api import RuntimeAPI
from pie.server import logs
from pie.server.auth import Authenticator, AuthLimits, new_internal_token
from pie.server.connections import GUARD, ConnectionGuard, GuardedSite, fit_fd_limit
from pie.server.http import build_app, close_sockets
from pie.server.limits import RepeatFilter
from pie.server.options import ServerOptions
from pie.server.state import ServerState
from pie.server.watchdog import watch_signals
from pie.wire.protocol import WS_PATH

log = logging.getLogger("pie.server")

EXIT_OK = 0
EXIT_STARTUP_FAILED = 1
EXIT_INTERRUPTED = 130
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SETTLE_S = 2.0  # after the runtime stops: time for final events to reach clients
KEEPALIVE_FOREVER_S = 3630.0  # aiohttp's own default, for idle_timeout_s = 0
# Loggers whose records can repeat thousands of times a second under abuse (accept() out of file
# descriptors, refused auth attempts, bad frames): each kind is logged once per interval with a count.
REPEATING_LOGGERS = ("asyncio", "aiohttp.server", "aiohttp.web", "aiohttp.access", "pie.server.auth",
                     "pie.server.session", "pie.server.connections")

RuntimeFactory = Callable[[Any], Awaitable[RuntimeAPI]]


class StartupError(PieError):
    """The server could not start (the message says why and what to change)."""


class Server:
    def __init__(self, config: Any, options: ServerOptions, *, runtime_factory: RuntimeFactory | None = None,
                 authenticator: Authenticator | None = None) -> None:
        self.config = config
        self.options = options
        self._runtime_factory = runtime_factory or _start_runtime
        self._authenticator = authenticator
        self.token = authenticator.token if authenticator else options.internal_token or new_internal_token()
        self.state: ServerState | None = None
        self.port: int | None = None
        self.started = asyncio.Event()
        self._should_exit = asyncio.Event()
        self._force_exit = asyncio.Event()
        self._sock: socket.socket | None = None
        self._runner: web.AppRunner | None = None
        self._site: GuardedSite | None = None

    @property
    def url(self) -> str:
        """The WebSocket URL clients connect to."""
        return f"ws://{_url_host(self.options.host)}:{self.port}{WS_PATH}"

    @property
    def http_url(self) -> str:
        return f"http://{_url_host(self.options.host)}:{self.port}"

    def request_exit(self, *, force: bool = False) -> None:
        """Start the shutdown (as the first signal would); `force` skips the graceful phase."""
        if force or self._should_exit.is_set():
            self._force_exit.set()
        self._should_exit.set()

    async def serve(self, *, handle_signals: bool = True) -> int:
        with self._telemetry(), quiet_repeats():
            signals = capture_signals(self._on_signal) if handle_signals else contextlib.nullcontext()
            # A signal while an inferlet blocks the loop still ends the process (pie.server.watchdog).
            watchdog = watch_signals(self.options.shutdown_timeout_s) if handle_signals else contextlib.nullcontext()
            with signals, watchdog:
                try:
                    await self.startup()
                except (PieError, OSError) as error:
                    log.error("startup failed: %s", error)
                    await self.shutdown()
                    return EXIT_STARTUP_FAILED
                await self.main_loop()
                await self.shutdown()
        return EXIT_INTERRUPTED if self._force_exit.is_set() else EXIT_OK

    def _telemetry(self) -> contextlib.AbstractContextManager[object]:
        """OTLP export per `[telemetry]`, unless the embedding program configured telemetry itself."""
        if telemetry.enabled() or not self.options.telemetry_enabled:
            return contextlib.nullcontext()
        return telemetry.configured(enabled=True, service_name=self.options.telemetry_service_name,
                                    endpoint=self.options.telemetry_endpoint)

    async def startup(self) -> None:
        # Bind first: a taken port fails in a moment, not after the model has loaded. Connections that
        # arrive while the runtime starts wait in the listen backlog.
        self._sock = _bind(self.options.host, self.options.port)
        self.port = self._sock.getsockname()[1]
        authenticator = self._authenticator or self._make_authenticator()
        runtime = await self._runtime_factory(self.config)
        self.state = ServerState(runtime, self.options, authenticator)
        app = build_app(self.state)
        options = self.options
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=SETTLE_S,
                                     keepalive_timeout=options.idle_timeout_s or KEEPALIVE_FOREVER_S)
        guard = ConnectionGuard(self._runner, max_connections=fit_fd_limit(options.max_connections),
                                header_timeout_s=options.header_timeout_s)
        app[GUARD] = guard
        await self._runner.setup()
        self._site = GuardedSite(self._runner, self._sock, guard)
        await self._site.start()
        auth = "on" if self.options.enable_auth else "off"
        logs.banner(runtime, self.config)
        log.info("pie serving on %s (HTTP %s), auth %s", self.url, self.http_url, auth)
        if not self.options.enable_auth and not _is_loopback(self.options.host):
            log.warning("authentication is off and the server listens on %s: anyone who can reach this port "
                        "can run inferlets. Set enable_auth = true, or bind 127.0.0.1", self.options.host)
        self.started.set()

    async def main_loop(self) -> None:
        await self._should_exit.wait()

    async def shutdown(self) -> None:
        state = self.state
        if state is not None:
            state.shutting_down = True
        if self._site is not None:
            await self._site.stop()  # no new connections
        if state is not None:
            await self._drain(state)
            await state.runtime.shutdown(grace_s=0.0)  # cancels the rest; their pages are freed
            in_use = sum(m.pages_used for m in state.runtime.models())
            log.info("inferlets stopped; KV pages still in use: %d", in_use)
            await state.tasks.settle(SETTLE_S)
            if self._runner is not None:
                await close_sockets(self._runner.app, "server shutting down")
            await state.tasks.cancel_all()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._sock is not None:
            self._sock.close()  # idempotent; the site closed it unless startup failed before serving
        log.info("pie stopped")

    async def _drain(self, state: ServerState) -> None:
        """Let running inferlets finish, for up to `shutdown_timeout_s` or until a second signal."""
        running = [p for p in state.runtime.processes() if p.status == "running"]
        if not running or self._force_exit.is_set():
            return
        log.info("waiting up to %g s for %d running inferlet(s); signal again to stop now",
                 self.options.shutdown_timeout_s, len(running))
        finished: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*(p.wait() for p in running)))
        forced: asyncio.Future[Any] = asyncio.ensure_future(self._force_exit.wait())
        await asyncio.wait([finished, forced], timeout=self.options.shutdown_timeout_s,
                           return_when=asyncio.FIRST_COMPLETED)
        for future in (finished, forced):
            future.cancel()
        await asyncio.gather(finished, forced, return_exceptions=True)

    def _on_signal(self, signum: int) -> None:
        if self._should_exit.is_set():
            log.warning("second %s: cancelling running inferlets now", signal.Signals(signum).name)
        else:
            log.info("%s: shutting down (signal again to force)", signal.Signals(signum).name)
        self.request_exit()

    def _make_authenticator(self) -> Authenticator:
        options = self.options
        limits = AuthLimits(options.auth_attempts_burst, options.auth_attempts_per_s,
                            options.auth_address_failures_burst, options.auth_address_failures_per_s)
        if not options.enable_auth:
            return Authenticator(enabled=False, keys=None, token=self.token, limits=limits)
        from pie.server.keys import load_keys  # the keystore `pie auth` writes

        return Authenticator(enabled=True, keys=load_keys(self.config), token=self.token, limits=limits)

    @property
    def guard(self) -> ConnectionGuard | None:
        """The connection cap and header deadline of the listening socket (once started)."""
        return self._site.guard if self._site is not None else None


@contextlib.contextmanager
def quiet_repeats(interval_s: float = 10.0) -> Iterator[RepeatFilter]:
    """While serving, log each kind of record of REPEATING_LOGGERS once per `interval_s`, with a count."""
    repeat = RepeatFilter(interval_s)
    loggers = [logging.getLogger(name) for name in REPEATING_LOGGERS]
    for logger in loggers:
        logger.addFilter(repeat)
    try:
        yield repeat
    finally:
        for logger in loggers:
            logger.removeFilter(repeat)


@contextlib.contextmanager
def capture_signals(handler: Callable[[int], None]) -> Iterator[None]:
    """Route SIGINT/SIGTERM to `handler` on the running loop; restore the previous handlers on exit.
    Outside the main thread (embedded servers, tests) signals are left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS}
    for sig in HANDLED_SIGNALS:
        loop.add_signal_handler(sig, handler, sig)
    try:
        yield
    finally:
        for sig in HANDLED_SIGNALS:
            loop.remove_signal_handler(sig)
            signal.signal(sig, previous[sig])


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {error.strerror}; pick another port with "
                           "`pie serve --port N` (or `port` in the config), or stop what holds it") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


async def _start_runtime(config: Any) -> RuntimeAPI:
    from pie.runtime.runtime import Runtime

    runtime = await Runtime.start(config)
    return cast(RuntimeAPI, runtime)  # Runtime implements RuntimeAPI (its list[Instance] is a list of ProcessAPI)


def run_server(config: Any, *, debug: bool = False, monitor: bool = False, log_level: str | None = None,
               log_format: str = "text") -> int:
    """Entry point of `pie serve`: serve until SIGINT/SIGTERM; returns the process exit code."""
    logs.configure(log_level or ("debug" if debug else "info"), log_format)
    options = ServerOptions.from_config(config)
    server = Server(config, options)

    async def main() -> int:
        if not monitor:
            return await server.serve()
        from pie.server.monitor import watch

        watcher = asyncio.create_task(watch(server))
        try:
            return await server.serve()
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    return asyncio.run(main())
