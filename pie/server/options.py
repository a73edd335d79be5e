"""What the network front needs from the configuration, in one frozen object."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pie.errors import ConfigError

MIB = 1024 * 1024
# [server] keys of the connection limits (pie.config.ServerConfig), read as they are named.
CONNECTION_KEYS = ("max_connections", "idle_timeout_s", "auth_timeout_s", "header_timeout_s", "auth_attempts_burst",
                   "auth_attempts_per_s", "auth_address_failures_burst", "auth_address_failures_per_s")

IMAGE_KEYS = ("allowed_image_urls", "max_image_bytes", "image_fetch_timeout_s")


def check_image_url_prefix(prefix: str) -> None:
    """An allowed_image_urls entry must name a scheme and a whole host, so a prefix cannot match another host
    (`https://a.com` would match `https://a.com.evil.net/`)."""
    scheme, sep, rest = prefix.partition("://")
    host = rest.split("/", 1)[0]
    if scheme not in ("http", "https") or not sep or not host or "/" not in rest or "@" in host:
        raise ConfigError(f"allowed_image_urls entry {prefix!r} is not an http(s) URL prefix ending its host with "
                          "'/'; write e.g. \"https://images.example.com/\"")


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8080  # 0 = any free port (`pie run` uses this)
    enable_auth: bool = False
    max_frame_bytes: int = 4 * MIB  # one WebSocket message; pie-client chunks are 256 KiB
    max_upload_bytes: int = 256 * MIB  # one reassembled program or file
    shutdown_timeout_s: float = 30.0  # graceful phase: running inferlets may finish within this
    detach_timeout_s: float = 600.0  # a process nobody is attached to is terminated after this
    max_connections: int = 1024  # open client connections (HTTP and WebSocket); more are answered 503
    idle_timeout_s: float = 300.0  # a connection with no traffic (and nothing streaming) is closed; 0 = never
    auth_timeout_s: float = 10.0  # a WebSocket not authenticated within this is closed
    header_timeout_s: float = 10.0  # a connection must send its first request's headers within this
    auth_attempts_burst: int = 10  # per connection ...
    auth_attempts_per_s: float = 2.0  # ... auth attempts at once and per second
    auth_address_failures_burst: int = 50  # per client address ...
    auth_address_failures_per_s: float = 1.0  # ... refused auth attempts at once and forgiven per second
    telemetry_enabled: bool = False
    telemetry_endpoint: str = "http://localhost:4317"
    telemetry_service_name: str = "pie"
    internal_token: str | None = None  # None = a fresh random token per start
    mcp_call_timeout_s: float = 30.0  # a relayed MCP call the client does not answer in time fails
    api_keys: tuple[str, ...] = ()  # HTTP API keys (pie.server.api.auth); PIE_API_KEY adds one
    metrics_public: bool = False  # /metrics without a key when keys are set
    allowed_image_urls: tuple[str, ...] = ()  # URL prefixes remote request images may come from; () = none
    max_image_bytes: int = 20 * MIB  # one encoded image of a request (data: URL, base64 or fetched)
    image_fetch_timeout_s: float = 10.0  # fetching one remote image, redirects included

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port is {self.port}; use 0 (any free port) to 65535")
        if self.max_frame_bytes < 64 * 1024:
            raise ConfigError(f"max_frame_bytes is {self.max_frame_bytes}; use at least 65536 (pie-client "
                              "sends 256 KiB chunks, so 1 MiB or more is practical)")
        for name in ("shutdown_timeout_s", "detach_timeout_s", "idle_timeout_s", "auth_attempts_per_s",
                     "auth_address_failures_per_s"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} is {getattr(self, name)}; use a number >= 0")
        for name in ("auth_timeout_s", "header_timeout_s", "image_fetch_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} is {getattr(self, name)}; use a number of seconds > 0")
        for name in ("max_connections", "auth_attempts_burst", "auth_address_failures_burst", "max_image_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} is {getattr(self, name)}; use 1 or more")
        for prefix in self.allowed_image_urls:
            check_image_url_prefix(prefix)

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> ServerOptions:
        """Read the server's keys from a `pie.config.Config` (flat keys, `[telemetry]`, optional `[server]`)."""
        server = getattr(config, "server", None)
        telemetry = getattr(config, "telemetry", None)
        values: dict[str, Any] = {}
        for name in ("host", "port", "enable_auth"):
            if hasattr(config, name):
                values[name] = getattr(config, name)
        for name in ("max_frame_bytes", "max_upload_bytes", "shutdown_timeout_s", "detach_timeout_s",
                     *CONNECTION_KEYS, "api_keys", "metrics_public", *IMAGE_KEYS):
            source = server if server is not None and hasattr(server, name) else config
            if hasattr(source, name):
                values[name] = getattr(source, name)
        mcp = getattr(config, "mcp", None)
        if mcp is not None:
            values["mcp_call_timeout_s"] = float(mcp.call_timeout_s)
        if telemetry is not None:
            values["telemetry_enabled"] = bool(getattr(telemetry, "enabled", False))
            values["telemetry_endpoint"] = getattr(telemetry, "endpoint", cls.telemetry_endpoint)
            values["telemetry_service_name"] = getattr(telemetry, "service_name", cls.telemetry_service_name)
        values.update(overrides)
        return cls(**values)
