"""The server configuration: `~/.pie/config.toml` -> frozen `Config`.

Both styles of Pie's documentation are accepted, per `[[model]]` entry:

    [[model]]                              [[model]]
    hf_repo = "Qwen/Qwen3-0.6B"            hf_repo = "Qwen/Qwen3-0.6B"
    device = ["cuda:0"]                    [model.driver]
    kv_page_size = 16                      type = "dev"
                                           device = ["cuda:0"]
                                           [model.driver.options]
                                           kv_page_size = 16

and `model` may be one table instead of a list. Engine options written at the top level
(`gpu_mem_utilization = 0.85`) are defaults for every model. Every key is checked: unknown keys,
wrong types and impossible values raise `ConfigError` naming the file, the dotted key
(`model[1].driver.options.kv_page_size`) and the fix. Parsing never imports torch; the default
device "auto" is resolved by the engine (cuda:0, then mps, then cpu).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pie.config_schema import Reader, field_names, join, option
from pie.engine.config import ATTENTION_BACKENDS, DTYPES, WEIGHT_DTYPES
from pie.errors import ConfigError
from pie.mcp_link import McpServerSpec

if TYPE_CHECKING:
    from pie.engine.config import EngineConfig
    from pie.runtime.sandbox.policy import SandboxPolicy

DEFAULT_MODEL = "Qwen/Qwen3-0.6B"
DEFAULT_DEVICE = "auto"  # the engine picks cuda:0, then mps, then cpu
CONFIG_FILE = "config.toml"
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def pie_home() -> Path:
    """`$PIE_HOME`, else `~/.pie`: the folder holding config.toml, authorized_users.toml, adapters/, ..."""
    return Path(os.environ.get("PIE_HOME") or Path.home() / ".pie").expanduser()


def default_config_path(home: Path | None = None) -> Path:
    return (home or pie_home()) / CONFIG_FILE


@dataclass(frozen=True)
class ModelOptions:
    """Engine options of one model (`[model.driver.options]`, or flat in `[[model]]`, or top-level defaults)."""

    gpu_mem_utilization: float = option(0.8, "fraction of GPU memory for the KV cache", above=0.0, max=1.0)
    kv_page_size: int = option(16, "KV cache page size in tokens", min=1)
    max_batch_tokens: int = option(10240, "cap on tokens summed over a batch", min=1)
    max_batch_size: int = option(512, "cap on sequences per batch", min=1)
    max_dist_size: int = option(32, "cap on the size of a distribution probe", min=1)
    max_num_embeds: int = option(128, "cap on embedding lookups per request", min=0)
    max_num_adapters: int = option(32, "LoRA adapter slots", min=0)
    max_adapter_rank: int = option(8, "largest LoRA rank", min=1)
    max_num_kv_pages: int = option(0, "KV page count; 0 = as many as memory allows", min=0)
    weight_dtype: str = option("auto", "weight precision", choices=WEIGHT_DTYPES)
    use_cuda_graphs: bool = option(False, "run decode steps (forward, logits, sampling) as CUDA graphs; "
                                          "the config a CUDA flavor writes turns it on")
    attention_backend: str = option("auto", "attention kernels", choices=ATTENTION_BACKENDS)
    cpu_paged_attention: bool = option(True, "CPU decode attention reads the paged KV cache in place (a C++ "
                                             "kernel built at first use); false: gather pages (reference)")
    cpu_kv_budget_gb: float = option(2.0, "KV pool size in GiB on CPU/MPS (free memory is not measurable there)",
                                     above=0.0)
    cpu_mem_budget_in_gb: float = option(0.0, "pinned host pool for KV swap in GiB; 0 disables", min=0.0)
    swap_pool_size: int = option(0, "pinned host KV pages for swap-out; 0 disables", min=0)
    runtime_quant: str = option("", "runtime quantization: '' (off) or 'fp8'", choices=("", "fp8"))
    max_num_state_slots: int = option(0, "hybrid models: recurrent-state slots; 0 = 2 x max_batch_size, at most "
                                         "half the memory budget", min=0)
    state_swap_pool_size: int = option(0, "hybrid models: host slots for suspended states; 0 disables", min=0)
    adapter_path: str = option("", "folder of LoRA adapters; '' = $PIE_HOME/adapters")
    venv: str = option("", "per-model interpreter: a venv folder (dev driver)", model_only=True)
    python: str = option("", "per-model interpreter: a python executable (dev driver)", model_only=True)
    ready_timeout_s: float = option(600.0, "seconds to wait for the driver to be ready", above=0.0,
                                    model_only=True)
    shutdown_timeout_s: float = option(5.0, "seconds to wait for the driver to stop", min=0.0, model_only=True)
    binary_path: str = option("", "accepted for older configs and ignored", model_only=True)


@dataclass(frozen=True)
class ModelConfig:
    name: str = option(DEFAULT_MODEL, "what inferlets pass to Model.load (default: hf_repo)")
    hf_repo: str = option(DEFAULT_MODEL, "Hugging Face repo id, local checkpoint folder, or pie/tiny-random")
    revision: str = option("", "Hugging Face revision (branch, tag or commit); '' = main")
    driver: str = option("dev", "driver type", choices=("dev", "cuda_native"))
    device: tuple[str, ...] = option((DEFAULT_DEVICE,), "devices: auto, cpu, mps, cuda:N")
    tensor_parallel_size: int = option(1, "devices sharing one copy of the model", min=1)
    activation_dtype: str = option("auto", "activation precision", choices=DTYPES)
    options: ModelOptions = field(default_factory=ModelOptions)

    def data_parallel_groups(self) -> list[list[str]]:
        """Devices split into groups of `tensor_parallel_size`: 4 devices, TP 2 -> 2 groups of 2."""
        tp = self.tensor_parallel_size
        return [list(self.device[i:i + tp]) for i in range(0, len(self.device), tp)]

    def engine_configs(self) -> tuple[EngineConfig, ...]:
        """One engine config per data-parallel group, in device order (what the runtime starts)."""
        return tuple(self.engine_config(group) for group in self.data_parallel_groups())

    def engine_config(self, rank_devices: list[str] | tuple[str, ...] | None = None) -> EngineConfig:
        """The engine's config for one data-parallel group (default: the first)."""
        from pie.engine.config import EngineConfig

        group = list(rank_devices) if rank_devices is not None else self.data_parallel_groups()[0]
        engine_keys = set(field_names(EngineConfig))
        values = {k: v for k, v in dataclasses.asdict(self.options).items() if k in engine_keys}
        if len(group) > 1:  # one tensor-parallel copy over the group: a worker process per device
            values |= {"tensor_parallel_size": len(group), "tp_devices": tuple(group)}
        return EngineConfig(model=self.hf_repo, device=group[0], activation_dtype=self.activation_dtype,
                            revision=self.revision or None, **values)


@dataclass(frozen=True)
class TelemetryConfig:
    enabled: bool = option(False, "export OpenTelemetry traces over OTLP")
    endpoint: str = option("http://localhost:4317", "OTLP collector endpoint")
    service_name: str = option("pie", "service name on the exported spans")


@dataclass(frozen=True)
class ServerConfig:
    """`[server]`: limits of the network front (defaults as in pie.server.options.ServerOptions)."""

    max_frame_bytes: int = option(4 * 1024 * 1024, "largest WebSocket message", min=64 * 1024)
    max_upload_bytes: int = option(256 * 1024 * 1024, "largest uploaded program or file", min=1)
    shutdown_timeout_s: float = option(30.0, "graceful shutdown: seconds running inferlets may finish in",
                                       min=0.0)
    detach_timeout_s: float = option(600.0, "a process nobody is attached to is stopped after this", min=0.0)
    max_connections: int = option(1024, "open client connections; more are answered 503", min=1)
    idle_timeout_s: float = option(300.0, "close a connection idle this long (nothing streaming); 0 = never",
                                   min=0.0)
    auth_timeout_s: float = option(10.0, "close a WebSocket not authenticated within this", above=0.0)
    header_timeout_s: float = option(10.0, "close a connection that sends no request headers within this",
                                     above=0.0)
    auth_attempts_burst: int = option(10, "auth attempts one connection may make at once", min=1)
    auth_attempts_per_s: float = option(2.0, "auth attempts per second one connection may make after that",
                                        min=0.0)
    auth_address_failures_burst: int = option(50, "refused auth attempts one address may make at once", min=1)
    auth_address_failures_per_s: float = option(1.0, "refused auth attempts forgiven per second per address",
                                                min=0.0)
    api_keys: tuple[str, ...] = option((), "HTTP API keys: key, sha256:<hex>, or name=key (also PIE_API_KEY)")
    metrics_public: bool = option(False, "serve /metrics without an API key when api_keys are set")
    allowed_image_urls: tuple[str, ...] = option((), "URL prefixes (e.g. https://images.example.com/) request "
                                                 "images may be fetched from; empty = remote URLs refused")
    max_image_bytes: int = option(20 * 1024 * 1024, "largest encoded image of an HTTP request", min=1)
    image_fetch_timeout_s: float = option(10.0, "seconds fetching one remote request image may take", above=0.0)

    def __post_init__(self) -> None:
        from pie.server.options import check_image_url_prefix

        for prefix in self.allowed_image_urls:
            check_image_url_prefix(prefix)


@dataclass(frozen=True)
class RuntimeConfig:
    """`[runtime]`: how inferlets run and what each may use; 0 = no limit. Limit names are those of
    pie.runtime.runtime.RuntimeLimits, which reads them from here."""

    isolation: str = option("auto", "trusted: inferlets run in the server process; isolated: one "
                            "sandbox process each ([sandbox]); auto: isolated when enable_auth is on and "
                            "more than one user is authorized, else trusted",
                            choices=("auto", "trusted", "isolated"))
    max_concurrent_processes: int = option(0, "running inferlets at once; 0 = unlimited", min=0)
    max_pages_per_instance: int = option(0, "KV pages one inferlet may hold", min=0)
    max_page_share_per_instance: float = option(0.5, "share of a KV pool one inferlet may hold; 0 = no "
                                                "share limit", min=0.0, max=1.0)
    max_contexts_per_instance: int = option(1024, "live contexts one inferlet may hold", min=0)
    max_forks_per_s: float = option(1000.0, "context forks per second one inferlet may make", min=0.0)
    max_fork_burst: int = option(2000, "forks one inferlet may make at once (token bucket depth)", min=1)
    max_tokens_per_instance: int = option(0, "tokens one inferlet may sample", min=0)
    max_wall_time_s: float = option(0.0, "seconds one inferlet may run", min=0.0)
    page_wait_timeout_s: float = option(30.0, "a pass waiting for pages fails after this", above=0.0)
    max_prefill_tokens_per_step: int = option(0, "prompt rows per batch while other passes wait; "
                                              "0 = half of max_batch_tokens", min=0)
    max_buffered_events: int = option(10_000, "events buffered per inferlet for slow clients", min=1)
    max_buffered_event_bytes: int = option(16 * 1024 * 1024, "bytes of events buffered per inferlet", min=0)
    max_buffered_event_bytes_per_user: int = option(64 * 1024 * 1024, "bytes of events buffered over all "
                                                    "of one user's inferlets", min=0)
    max_inbox_bytes: int = option(16 * 1024 * 1024, "bytes of client messages and files an inferlet has "
                                  "not yet received", min=0)
    max_message_bytes_per_user: int = option(16 * 1024 * 1024, "bytes of one user's queued messages and "
                                             "broadcast backlogs", min=0)
    max_upload_bytes_per_user: int = option(64 * 1024 * 1024, "bytes of one user's uploaded programs",
                                            min=0)
    finished_retention_s: float = option(600.0, "seconds a finished inferlet's events and result are kept "
                                         "for late attach", min=0.0)
    max_finished_processes: int = option(1024, "finished inferlets kept for late attach", min=0)
    max_images_per_instance: int = option(256, "images one inferlet may prepare", min=0)
    max_image_pixels: int = option(16 * 1024 * 1024, "width x height of one decoded image", min=0)
    max_audio_seconds: float = option(30.0, "seconds of one decoded audio clip (the model's own limit, Gemma "
                                      "4's 30 s, still applies)", min=0.0)
    inferlet_paths: tuple[Path, ...] = option((), "extra folders searched for inferlets after "
                                              "the standard ones and $PIE_HOME/inferlets")
    sandbox: SandboxPolicy | None = None  # isolated mode's policy (the [sandbox] table); None when trusted


@dataclass(frozen=True)
class McpConfig:
    """`[mcp]`: how `pie serve` reaches the MCP servers of `[[mcp_server]]`."""

    call_timeout_s: float = option(30.0, "an MCP call that takes longer fails (its inferlet gets an error)",
                                   above=0.0)
    allowed_urls: tuple[str, ...] = option(("http://127.0.0.1", "http://localhost"),
                                           "URL prefixes an http [[mcp_server]] may use")


@dataclass(frozen=True)
class McpServerConfig:
    """One `[[mcp_server]]`: an MCP server every inferlet may use, started (stdio) or reached (http) by
    `pie serve`."""

    name: str = option("", "the name inferlets connect to (inferlet.mcp.connect(name))")
    transport: str = option("stdio", "stdio: start `command`; http: streamable HTTP at `url`",
                            choices=("stdio", "http"))
    command: str = option("", "the program to start (stdio)")
    args: tuple[str, ...] = option((), "its arguments (stdio)")
    url: str = option("", "the server's streamable-HTTP endpoint (http; must match [mcp] allowed_urls)")

    def spec(self) -> McpServerSpec:
        return McpServerSpec(self.name, self.transport, self.command, self.args, self.url)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Config:
    host: str = option("127.0.0.1", "interface to listen on")
    port: int = option(8080, "TCP port to listen on (0 = any free port)", min=0, max=65535)
    enable_auth: bool = option(False, "require SSH-key authentication (authorized_users.toml)")
    models: tuple[ModelConfig, ...] = (ModelConfig(),)
    defaults: ModelOptions = field(default_factory=ModelOptions)  # the top-level engine options
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    mcp: McpConfig = field(default_factory=McpConfig)
    mcp_servers: tuple[McpServerConfig, ...] = ()  # the [[mcp_server]] tables
    pie_home: Path = field(default_factory=pie_home)
    source: Path | None = None  # the file read; None = built-in defaults (no file)
    notes: tuple[str, ...] = ()  # accepted-but-ignored keys and engine limits, for `pie config validate`

    @property
    def adapter_path(self) -> Path:
        """The top-level adapter folder (a model may name its own in its options)."""
        return Path(self.defaults.adapter_path or self.pie_home / "adapters").expanduser()

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise ConfigError(f"no model named {name!r} in {self.source or 'the default config'}; "
                          f"configured: {', '.join(m.name for m in self.models)}")

    def with_overrides(self, **values: Any) -> Config:
        """Command-line overrides (host, port, enable_auth); None values are left as configured."""
        given = {k: v for k, v in values.items() if v is not None}
        assert given.keys() <= set(_TOP_KEYS), f"not a command-line override: {given.keys() - set(_TOP_KEYS)}"
        return dataclasses.replace(self, **Reader("command line").values(Config, given, "", only=_TOP_KEYS))

    def to_toml(self) -> str:
        from pie.config_io import config_to_toml

        return config_to_toml(self)


# -- loading ---------------------------------------------------------------------------------------

_TOP_KEYS = ("host", "port", "enable_auth")
_TABLES = ("model", "telemetry", "server", "runtime", "sandbox", "mcp", "mcp_server")
_LEGACY_TOP = ("shutdown_timeout_s",)  # flat form of [server] shutdown_timeout_s
_MODEL_KEYS = ("name", "hf_repo", "revision", "device", "tensor_parallel_size", "activation_dtype")
_DRIVER_KEYS = ("type", "device", "tensor_parallel_size", "activation_dtype", "options")


def load_config(path: Path | str | None = None, *, home: Path | None = None) -> Config:
    """Read `path` (default `$PIE_HOME/config.toml`). With no path and no file: the built-in defaults."""
    home = home or pie_home()
    if path is None:
        path = default_config_path(home)
        if not path.exists():
            return parse_config({}, source=None, home=home)
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; create one with `pie config init --config {path}`") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read it ({error.strerror}); check its permissions") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error}); fix the syntax at that line") from None
    return parse_config(data, source=path, home=home)


def parse_config(data: Mapping[str, Any], *, source: Path | None, home: Path | None = None) -> Config:
    home = home or pie_home()
    reader = Reader(str(source) if source else "<defaults>")
    top_options = field_names(ModelOptions, include_model_only=False)
    reader.check_keys(data, (*_TOP_KEYS, *_TABLES, *_LEGACY_TOP, *top_options), "")
    values = reader.values(Config, data, "", only=_TOP_KEYS)
    defaults = reader.build(ModelOptions, reader.values(ModelOptions, data, "", only=top_options), "")
    if not defaults.adapter_path:
        defaults = dataclasses.replace(defaults, adapter_path=str(home / "adapters"))
    models = _parse_models(reader, data.get("model"), defaults)
    mcp = _section(reader, McpConfig, data, "mcp")
    return Config(**values, models=models, defaults=defaults,
                  telemetry=_section(reader, TelemetryConfig, data, "telemetry"),
                  server=_server(reader, data), runtime=_runtime(reader, data),
                  mcp=mcp, mcp_servers=_mcp_servers(reader, data.get("mcp_server", []), mcp),
                  pie_home=home, source=source, notes=tuple(reader.notes))


def _section(reader: Reader, cls: type, data: Mapping[str, Any], name: str) -> Any:
    table = reader.table(data.get(name, {}), name)
    reader.check_keys(table, field_names(cls), name)
    return reader.build(cls, reader.values(cls, table, name), name)


def _mcp_servers(reader: Reader, raw: Any, mcp: McpConfig) -> tuple[McpServerConfig, ...]:
    if not isinstance(raw, list):
        raise reader.error("mcp_server", "is not an array of tables", "write each server as [[mcp_server]]")
    servers: list[McpServerConfig] = []
    for i, entry in enumerate(raw):
        key = f"mcp_server[{i}]"
        table = reader.table(entry, key)
        reader.check_keys(table, field_names(McpServerConfig), key)
        server: McpServerConfig = reader.build(McpServerConfig, reader.values(McpServerConfig, table, key), key)
        if not server.name:
            raise reader.error(f"{key}.name", "is missing", 'name the server, e.g. name = "files"')
        if server.name in (s.name for s in servers):
            raise reader.error(f"{key}.name", f"= {server.name!r} is used twice", "give each server its own name")
        if server.transport == "stdio" and not server.command:
            raise reader.error(f"{key}.command", "is missing", 'a stdio server needs command = "..." (and args)')
        if server.transport == "http" and not any(server.url.startswith(p) for p in mcp.allowed_urls):
            raise reader.error(f"{key}.url", f"= {server.url!r} is not under [mcp] allowed_urls "
                               f"({', '.join(mcp.allowed_urls) or 'none'})", "add its prefix to [mcp] allowed_urls")
        servers.append(server)
    return tuple(servers)


def _server(reader: Reader, data: Mapping[str, Any]) -> ServerConfig:
    server = dict(reader.table(data.get("server", {}), "server"))
    if "shutdown_timeout_s" in data:
        if "shutdown_timeout_s" in server:
            raise reader.error("shutdown_timeout_s", "is set both at the top level and in [server]",
                               "keep only [server] shutdown_timeout_s")
        server["shutdown_timeout_s"] = data["shutdown_timeout_s"]
    return _section(reader, ServerConfig, {"server": server}, "server")


def _runtime(reader: Reader, data: Mapping[str, Any]) -> RuntimeConfig:
    table = reader.table(data.get("runtime", {}), "runtime")
    reader.check_keys(table, [k for k in field_names(RuntimeConfig) if k != "sandbox"], "runtime")
    values = reader.values(RuntimeConfig, table, "runtime")
    if values.get("isolation", "auto") != "trusted":  # auto may turn out isolated (pie.runtime.isolation)
        values["sandbox"] = _sandbox(reader, data.get("sandbox", {}))
    elif "sandbox" in data:
        reader.notes.append("[sandbox] is ignored: inferlets run in the server process "
                            "([runtime] isolation = \"trusted\"); set isolation = \"isolated\" to use it")
    return reader.build(RuntimeConfig, values, "runtime")


def _sandbox(reader: Reader, raw: Any) -> SandboxPolicy:
    from pie.runtime.sandbox.policy import SandboxPolicy

    table = reader.table(raw, "sandbox")
    reader.check_keys(table, field_names(SandboxPolicy), "sandbox")
    return reader.build(SandboxPolicy, reader.values(SandboxPolicy, table, "sandbox"), "sandbox")


def _parse_models(reader: Reader, raw: Any, defaults: ModelOptions) -> tuple[ModelConfig, ...]:
    if raw is None:
        return (ModelConfig(options=defaults),)
    entries = [(reader.table(raw, "model"), "model")] if isinstance(raw, Mapping) else None
    if entries is None:
        if not isinstance(raw, list) or not raw:
            raise reader.error("model", "must be a [[model]] table or a list of them",
                               "write [[model]] followed by hf_repo = \"...\"")
        entries = [(reader.table(entry, f"model[{i}]"), f"model[{i}]") for i, entry in enumerate(raw)]
    models = tuple(_parse_model(reader, entry, prefix, defaults) for entry, prefix in entries)
    seen: dict[str, int] = {}
    for i, m in enumerate(models):
        if m.name in seen:
            raise reader.error(f"model[{i}].name", f"= {m.name!r} is also the name of model[{seen[m.name]}]",
                               "give each model a distinct name (name = \"...\")")
        seen[m.name] = i
    return models


def _parse_model(reader: Reader, entry: Mapping[str, Any], prefix: str, defaults: ModelOptions) -> ModelConfig:
    option_keys = field_names(ModelOptions)
    reader.check_keys(entry, (*_MODEL_KEYS, "driver", *option_keys), prefix)
    driver = reader.table(entry.get("driver", {}), join(prefix, "driver"))
    reader.check_keys(driver, _DRIVER_KEYS, join(prefix, "driver"))
    driver_options = reader.table(driver.get("options", {}), join(prefix, "driver.options"))
    reader.check_keys(driver_options, option_keys, join(prefix, "driver.options"))

    values = reader.values(ModelConfig, entry, prefix, only=_MODEL_KEYS)
    from_driver = reader.values(ModelConfig, {("driver" if k == "type" else k): v for k, v in driver.items()},
                                join(prefix, "driver"), only=("driver", *_MODEL_KEYS))
    flat_options = reader.values(ModelOptions, entry, prefix, only=option_keys)
    nested_options = reader.values(ModelOptions, driver_options, join(prefix, "driver.options"))
    _refuse_twice(reader, prefix, values, from_driver, "driver")
    _refuse_twice(reader, prefix, flat_options, nested_options, "driver.options")
    values.update(from_driver)
    options = reader.build(ModelOptions, {**dataclasses.asdict(defaults), **flat_options, **nested_options},
                           join(prefix, "driver.options"))
    values.setdefault("name", values.get("hf_repo", DEFAULT_MODEL))
    if "device" in values:
        values["device"] = _devices(reader, values["device"], prefix)
    model = ModelConfig(**values, options=options)
    _check_parallelism(reader, model, prefix)
    _note_model(reader, model, prefix)
    return model


def _refuse_twice(reader: Reader, prefix: str, flat: Mapping[str, Any], nested: Mapping[str, Any], where: str) -> None:
    for key in flat.keys() & nested.keys():
        raise reader.error(join(prefix, key), f"is set both here and as {join(prefix, where)}.{key}",
                           "keep one of the two")


def _devices(reader: Reader, devices: tuple[str, ...], prefix: str) -> tuple[str, ...]:
    key = join(prefix, "device")
    if not devices:
        raise reader.error(key, "is an empty list", 'name at least one device, e.g. device = ["cuda:0"]')
    normal = []
    for i, name in enumerate(devices):
        if not _DEVICE.match(name):
            raise reader.error(f"{key}[{i}]", f"= {name!r} is not a device",
                               'use "cuda:N", "mps", "cpu" or "auto" (cuda:0, then mps, then cpu)')
        normal.append("cuda:0" if name == "cuda" else name)
    if len(set(normal)) != len(normal):
        raise reader.error(key, f"= {list(devices)} names a device twice", "list each device once")
    if len(normal) > 1 and any(d in ("auto", "cpu", "mps") for d in normal):
        raise reader.error(key, f"= {list(devices)} mixes {', '.join(d for d in normal if not d.startswith('cuda'))} "
                           "with other devices", "several devices must all be cuda:N; otherwise list one")
    return tuple(normal)


def _check_parallelism(reader: Reader, model: ModelConfig, prefix: str) -> None:
    tp, n = model.tensor_parallel_size, len(model.device)
    if n % tp:
        raise reader.error(join(prefix, "tensor_parallel_size"), f"= {tp} does not divide the {n} device(s) "
                           f"{list(model.device)}", f"use a divisor of {n} (1 = a full copy per device, "
                           f"{n} = one copy over all of them)")


def _note_model(reader: Reader, model: ModelConfig, prefix: str) -> None:
    if model.driver == "cuda_native":
        reader.notes.append(f"{prefix}.driver.type = \"cuda_native\": this pie has one engine (the Python dev "
                            "driver); the model runs on it")
    if model.options.binary_path:
        reader.notes.append(f"{prefix}: binary_path is ignored: the engine is built into pie")
