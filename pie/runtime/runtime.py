"""`Runtime`: what the server runs (`pie.runtime.api.RuntimeAPI`).

    runtime = await Runtime.start(config)
    process = await runtime.launch("text-completion", '{"prompt": "hi"}', username="alice")
    final = await process.wait()

Per model it starts one engine client per data-parallel group and builds a
`ModelRuntime` over them (per group a page pool, a prefix trie and a
scheduler; per model a snapshot store). Instances are launched from the
program registry and run by the inferlet runner (in a sandbox process each
when `[runtime] isolation = "isolated"`); `spawn` runs any body coroutine as
an instance (tests, and hosts of programs from other sources).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pie.engine.config import EngineConfig
from pie.errors import ConfigError, RequestError
from pie.mcp_link import McpServerSpec
from pie.runtime.api import EngineClient, ModelStatus, ProgramInfo
from pie.runtime.host import InstanceHost
from pie.runtime.instance import Body, Instance, InstanceLimits
from pie.runtime.mcp import McpRelay, McpRouter, SharedMcpServers
from pie.runtime.messaging import MessageBus
from pie.runtime.model_runtime import EngineGroup, ModelRuntime
from pie.runtime.quotas import ByteQuota

if TYPE_CHECKING:
    from pie.runtime.programs import Program, ProgramRegistry
    from pie.runtime.sandbox.policy import SandboxPolicy

__all__ = ["EngineGroup", "ModelRuntime", "ModelSpec", "Runtime", "RuntimeConfig", "RuntimeLimits", "runtime_config"]

SWITCH_INTERVAL_S = 0.0005  # see Runtime.start
GC_YOUNG_THRESHOLD = 20_000  # allocations between young collections while serving (CPython's default: 700)
log = logging.getLogger(__name__)


MIB = 1024 * 1024


@dataclass(frozen=True)
class RuntimeLimits:
    """[runtime] limits; 0 means no limit. The tenancy limits are on by default, so that no one instance
    or user can hold the whole pool, the loop or the server's memory (docs/configuration.md)."""

    max_pages_per_instance: int = 0
    max_page_share_per_instance: float = 0.5  # of a pool's pages, held by one instance
    max_contexts_per_instance: int = 1024
    max_forks_per_s: float = 1000.0  # a token bucket per instance ...
    max_fork_burst: int = 2000  # ... of this depth
    max_tokens_per_instance: int = 0  # sampled tokens; a launch's token_budget can only lower it
    max_wall_time_s: float = 0.0
    page_wait_timeout_s: float = 30.0  # a pass waiting for pages while nothing can run fails after this
    max_prefill_tokens_per_step: int = 0  # prefill rows per batch while other passes wait; 0 = half a batch
    max_buffered_events: int = 10_000
    max_buffered_event_bytes: int = 16 * MIB  # per instance: output waiting for its client
    max_buffered_event_bytes_per_user: int = 64 * MIB  # the same, over all of a user's instances
    max_inbox_bytes: int = 16 * MIB  # per instance: client messages and files not yet received
    max_message_bytes_per_user: int = 16 * MIB  # queued push/pull messages and broadcast backlogs
    max_upload_bytes_per_user: int = 64 * MIB  # uploaded programs held in memory
    finished_retention_s: float = 600.0  # a finished instance (events, result) is forgotten after this
    max_finished_processes: int = 1024  # finished instances kept for late attach / wait
    max_concurrent_processes: int = 0  # instances running at once; launches past it wait for a slot
    max_images_per_instance: int = 256  # images one instance may prepare
    max_image_pixels: int = 16 * MIB  # width x height of one image (decoded)
    max_audio_seconds: float = 30.0  # one audio clip (decoded)

    def for_instance(self, token_budget: int | None) -> InstanceLimits:
        tokens = self.max_tokens_per_instance
        if token_budget is not None:
            tokens = min(tokens, token_budget) if tokens else token_budget
        return InstanceLimits(max_pages=self.max_pages_per_instance, max_page_share=self.max_page_share_per_instance,
                              max_contexts=self.max_contexts_per_instance, forks_per_s=self.max_forks_per_s,
                              fork_burst=self.max_fork_burst, max_tokens=tokens,
                              max_wall_time_s=self.max_wall_time_s, max_buffered_events=self.max_buffered_events,
                              max_buffered_event_bytes=self.max_buffered_event_bytes,
                              max_inbox_bytes=self.max_inbox_bytes, max_images=self.max_images_per_instance,
                              max_image_pixels=self.max_image_pixels, max_audio_seconds=self.max_audio_seconds)


@dataclass(frozen=True, init=False)
class ModelSpec:
    """A served model: the name inferlets pass to Model.load and one engine config per data-parallel group."""

    name: str
    engines: tuple[EngineConfig, ...]
    adapter_dir: Path | None  # LoRA adapters' folder (`adapter_path`); None = $PIE_HOME/adapters
    ready_timeout_s: float  # how long tensor-parallel worker processes may take to load the model

    def __init__(self, name: str, engines: EngineConfig | Sequence[EngineConfig], *,
                 adapter_dir: Path | None = None, ready_timeout_s: float = 600.0) -> None:
        configs = (engines,) if isinstance(engines, EngineConfig) else tuple(engines)
        if not configs:
            raise ConfigError(f"model {name!r} has no engine: give it at least one device")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "engines", configs)
        object.__setattr__(self, "adapter_dir", adapter_dir)
        object.__setattr__(self, "ready_timeout_s", ready_timeout_s)

    @property
    def engine(self) -> EngineConfig:
        """The first group's engine config (the only one without data parallelism)."""
        return self.engines[0]


@dataclass(frozen=True)
class RuntimeConfig:
    models: tuple[ModelSpec, ...]
    limits: RuntimeLimits = field(default_factory=RuntimeLimits)
    inferlet_paths: tuple[Path, ...] = ()  # searched after the standard library and ~/.pie/inferlets
    pie_home: Path | None = None
    sandbox: SandboxPolicy | None = None  # isolated mode: each launched program runs in a sandbox process
    freeze_gc: bool = True  # move startup objects out of the collector's sight (see Runtime.start)
    mcp_servers: tuple[McpServerSpec, ...] = ()  # [[mcp_server]]: shared MCP servers (pie.runtime.mcp)
    mcp_call_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("no models configured: add a [[model]] section")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ConfigError(f"model names must be unique, got {names}")


class Runtime:
    def __init__(self, models: Mapping[str, ModelRuntime], limits: RuntimeLimits,
                 registry: ProgramRegistry | None = None, sandbox: SandboxPolicy | None = None,
                 mcp: SharedMcpServers | None = None) -> None:
        assert models, "a runtime serves at least one model"
        self._models = dict(models)
        self.default_model = next(iter(self._models))
        self.limits = limits
        self.sandbox = sandbox
        self.mcp = mcp  # the operator's shared MCP servers, if any
        self.bus = MessageBus(max_bytes_per_user=limits.max_message_bytes_per_user)
        self._event_bytes = ByteQuota(limits.max_buffered_event_bytes_per_user, "max_buffered_event_bytes_per_user")
        self._registry = registry
        self._processes: dict[str, Instance] = {}
        self._finished: collections.deque[str] = collections.deque()  # ids of ended instances, oldest first
        # [runtime] max_concurrent_processes: an admission semaphore (as in Pie): launches past the limit
        # are accepted and wait for a running instance to end. None = unlimited, and no wrapper at all.
        n = limits.max_concurrent_processes
        self._admission = asyncio.Semaphore(n) if n else None
        self._closing = False
        self._froze_gc = False
        self._gc_threshold: tuple[int, ...] | None = None  # the collector's thresholds before `start`

    @classmethod
    async def start(cls, config: Any, *, engines: Mapping[str, EngineClient] | None = None) -> Runtime:
        """Build the runtime. `engines` (by model name) are used instead of starting in-process engines
        for those models (single-group models only); the caller keeps them (shutdown does not close them)."""
        from pie.runtime.programs import ProgramRegistry, operator_paths, stdlib_path

        cfg = runtime_config(config)
        if cfg.sandbox is not None:  # isolated mode: refuse to start without every OS sandbox layer
            from pie.runtime.sandbox.layers import require

            await asyncio.to_thread(require, cfg.sandbox)
        given = dict(engines or {})
        started: dict[str, tuple[EngineClient, ...]] = {}
        models: dict[str, ModelRuntime] = {}
        try:
            # One model after another: loading measures free device memory to size the KV pool, so two
            # models sharing a device must not load at the same time. A model's groups load side by
            # side: their devices are distinct (the config refuses a device listed twice; CPU pools are
            # sized from a budget, not measured).
            for spec in cfg.models:
                if spec.name in given:
                    assert len(spec.engines) == 1, f"model {spec.name!r}: a given engine serves one group only"
                else:
                    started[spec.name] = await _start_model_engines(spec)
            for spec in cfg.models:
                # The config's adapter folder, else this runtime's PIE_HOME's (ModelRuntime: the env's).
                adapter_dir = spec.adapter_dir or (cfg.pie_home / "adapters" if cfg.pie_home else None)
                models[spec.name] = ModelRuntime(spec.name, started.get(spec.name) or given[spec.name],
                                                 cfg.limits, owns_engine=spec.name in started,
                                                 adapter_dir=adapter_dir)
        except BaseException:
            for model in models.values():
                await model.close()  # its schedulers, and its engines when started here
            for name, clients in started.items():
                if name not in models:
                    for client in clients:
                        await client.close()
            raise
        registry = ProgramRegistry(operator_paths(cfg.pie_home, cfg.inferlet_paths), standard=stdlib_path(),
                                   max_upload_bytes_per_user=cfg.limits.max_upload_bytes_per_user)
        shared = SharedMcpServers(cfg.mcp_servers, call_timeout_s=cfg.mcp_call_timeout_s) if cfg.mcp_servers else None
        runtime = cls(models, cfg.limits, registry, cfg.sandbox, mcp=shared)
        if shared is not None:
            shared.start()
        if cfg.freeze_gc:
            # The hundreds of thousands of objects of torch, transformers and the model live as long as
            # the server; full collections scanning them cost ~40% of the per-step runtime overhead with
            # 256 instances. Frozen, the collector only walks what serving creates (undone at shutdown;
            # no collection first: it would add 0.1 s to every start for a little startup garbage).
            gc.freeze()
            runtime._froze_gc = True
            # Serving allocates in bursts (a few objects per stream start and end, hundreds of streams
            # at once) that mostly live on: with the default 700 the young collections come every few
            # hundred streams and promote them, and every few runs a full collection walks all of them
            # (about 15% of the host time of 256 streams' whole generations). Young collections every
            # 20,000 allocations keep that to one every few thousand streams; cycles are rare garbage.
            runtime._gc_threshold = gc.get_threshold()
            gc.set_threshold(max(GC_YOUNG_THRESHOLD, runtime._gc_threshold[0]), *runtime._gc_threshold[1:])
        # The engine's worker thread needs the GIL for a moment between device calls (to return a batch,
        # take the next). With CPython's default 5 ms switch interval it waits that long whenever the
        # event loop is busy building or landing a batch, and the device idles; 0.5 ms bounds the wait
        # (measured with `bench/runtime_overhead.py --engine sleep:5`: 0.72 -> 0.80 of the bound, loaded).
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        return runtime

    # -- models and programs --------------------------------------------------------------------

    def model(self, name: str = "") -> ModelRuntime:
        return self._models[name or self.default_model]

    def models(self) -> list[ModelStatus]:
        return [m.status() for m in self._models.values()]

    @property
    def registry(self) -> ProgramRegistry:
        if self._registry is None:
            raise RequestError("this runtime has no program registry; launch bodies with `spawn`")
        return self._registry

    def programs(self, username: str | None = None) -> list[ProgramInfo]:
        """What `username` can launch (None: the installed programs only)."""
        return self.registry.programs(username)

    def has_program(self, spec: str, username: str | None = None) -> bool:
        return self.registry.has(spec, username)

    def add_program(self, name: str, version: str, files: dict[str, bytes], manifest: str, *, owner: str,
                    force: bool = False) -> ProgramInfo:
        """`owner`'s upload: only `owner` ever resolves to it (pie.runtime.programs)."""
        return self.registry.add(name, version, files, manifest, owner=owner, force=force)

    def standard_program(self, name: str) -> str:
        """The standard inferlet `name` pinned by its content hash: what server-internal launches use."""
        return self.registry.standard_spec(name)

    # -- processes ------------------------------------------------------------------------------

    async def launch(self, program: str, input: str, *, username: str, token_budget: int | None = None,
                     mcp_session: McpRelay | None = None) -> Instance:
        resolved = self.registry.resolve(program, username)
        instance = self.spawn(_program_body(resolved, input, self.sandbox), program=resolved.spec,
                              username=username, token_budget=token_budget, mcp_session=mcp_session)
        instance.input = input
        return instance

    def spawn(self, body: Body, *, program: str, username: str, token_budget: int | None = None,
              mcp_session: McpRelay | None = None) -> Instance:
        """Run `body(instance)` as a new instance with its own host; returns at once.

        `mcp_session`: the MCP servers of the client session that launched it (pie.runtime.mcp).
        Past `max_concurrent_processes` running instances, the body waits for a slot (the instance is
        listed, attachable and terminable meanwhile; its `max_wall_time_s` counts from admission)."""
        if self._closing:
            raise RequestError("the server is shutting down; launch again once it is back")
        instance = Instance(str(uuid.uuid4()), program, username, self.limits.for_instance(token_budget),
                            self._event_bytes)
        instance.host = InstanceHost(instance, self._models, self.default_model, self.bus.mailbox(username))
        instance.host.mcp = McpRouter(mcp_session, self.mcp)
        self._processes[instance.id] = instance
        admission = self._admission
        instance.start(body if admission is None else _admitted(body, admission), on_exit=self._on_exit)
        return instance

    def process(self, process_id: str) -> Instance | None:
        return self._processes.get(process_id)

    def processes(self, username: str | None = None) -> list[Instance]:
        return [p for p in self._processes.values() if username is None or p.username == username]

    def _on_exit(self, instance: Instance) -> None:
        self._finished.append(instance.id)
        while len(self._finished) > self.limits.max_finished_processes:
            self._forget(self._finished.popleft())
        if self.limits.finished_retention_s:
            asyncio.get_running_loop().call_later(self.limits.finished_retention_s, self._forget, instance.id)

    def _forget(self, process_id: str) -> None:
        """A finished instance leaves the listing and frees what it still buffers (retention is up)."""
        instance = self._processes.pop(process_id, None)
        if instance is not None:
            instance.forget()

    async def shutdown(self, grace_s: float) -> None:
        """Let instances finish for up to `grace_s`, terminate the rest (freeing their pages), stop engines."""
        self._closing = True
        running = [p for p in self._processes.values() if not p.done]
        if running and grace_s > 0:
            await asyncio.wait([asyncio.ensure_future(p.wait()) for p in running], timeout=grace_s)
        for p in running:
            await p.terminate("the server is shutting down")
        for model in self._models.values():
            await model.close()
        if self.mcp is not None:
            await self.mcp.close()
        if self._froze_gc:
            gc.unfreeze()
            self._froze_gc = False
        if self._gc_threshold is not None:
            gc.set_threshold(*self._gc_threshold)
            self._gc_threshold = None

    def check_integrity(self) -> None:
        for model in self._models.values():
            model.check_integrity()


def runtime_config(config: Any) -> RuntimeConfig:
    """A `RuntimeConfig`, or anything shaped like `pie.config.Config` (models with a name and engine
    configs; `runtime` with the [runtime] keys, `isolation` and the [sandbox] policy)."""
    if isinstance(config, RuntimeConfig):
        return config
    models = tuple(ModelSpec(m.name, _engine_configs(m), adapter_dir=_adapter_dir(config, m),
                             ready_timeout_s=getattr(getattr(m, "options", None), "ready_timeout_s", 600.0))
                   for m in config.models)
    runtime = getattr(config, "runtime", None)
    fields = RuntimeLimits.__dataclass_fields__
    limits = RuntimeLimits(**{k: getattr(runtime, k) for k in fields if hasattr(runtime, k)})
    paths = tuple(Path(p) for p in getattr(runtime, "inferlet_paths", ()) or ())
    mcp = getattr(config, "mcp", None)
    return RuntimeConfig(models, limits, paths, getattr(config, "pie_home", None), sandbox=_sandbox(config),
                         mcp_servers=tuple(s.spec() for s in getattr(config, "mcp_servers", ())),
                         mcp_call_timeout_s=getattr(mcp, "call_timeout_s", 30.0))


def _engine_configs(model: Any) -> tuple[EngineConfig, ...]:
    """One engine config per data-parallel group of a `pie.config.ModelConfig` (or of a model shaped like
    it with one `engine_config()`, or an `engine`)."""
    if callable(getattr(model, "engine_configs", None)):
        return tuple(model.engine_configs())
    if callable(getattr(model, "engine_config", None)):
        return (model.engine_config(),)
    return (model.engine,)


def _adapter_dir(config: Any, model: Any) -> Path | None:
    """A model's `adapter_path` option, else the config's top-level one (None: the runtime's default)."""
    own = getattr(getattr(model, "options", None), "adapter_path", "")
    if own:
        return Path(own).expanduser()
    top = getattr(config, "adapter_path", None)
    return Path(top) if top is not None else None


def _sandbox(config: Any) -> SandboxPolicy | None:
    """The sandbox policy when inferlets run isolated (pie.runtime.isolation decides `auto`): [sandbox],
    or its defaults; None when trusted."""
    from pie.runtime.isolation import effective_isolation

    if effective_isolation(config) != "isolated":
        return None
    policy = getattr(getattr(config, "runtime", None), "sandbox", None)
    if policy is None:
        from pie.runtime.sandbox.policy import SandboxPolicy

        policy = SandboxPolicy()
    return policy


async def _start_model_engines(spec: ModelSpec) -> tuple[EngineClient, ...]:
    """The engine clients of every data-parallel group of a model, started side by side; if one fails,
    the others are closed and its error raised."""
    many = len(spec.engines) > 1
    tasks = [asyncio.ensure_future(_start_group_engine(config, f"{spec.name}/dp{i}" if many else spec.name,
                                                       spec.ready_timeout_s))
             for i, config in enumerate(spec.engines)]
    try:
        await asyncio.wait(tasks)
        return tuple(task.result() for task in tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            if not task.cancelled() and task.exception() is None:
                await task.result().close()
        raise


async def _start_group_engine(config: EngineConfig, name: str, ready_timeout_s: float) -> EngineClient:
    """The engine client of one data-parallel group, named `name` (threads, logs).

    This is the one place that decides how a group's engine runs: one device is an engine in this
    process on its own thread; a tensor-parallel group is one worker process per rank
    (`pie.runtime.worker_client`), which keeps torch.distributed out of the server process."""
    if config.tensor_parallel_size > 1:
        from pie.runtime.worker_client import WorkerEngine

        devices = list(config.tp_devices) or [config.device] * config.tensor_parallel_size
        return await WorkerEngine.start(config, devices, name, ready_timeout_s=ready_timeout_s)

    from pie.runtime.engine_client import InProcessEngine

    return await InProcessEngine.start(config, name)


def _admitted(body: Body, admission: asyncio.Semaphore) -> Body:
    """`body`, run once `admission` has a free slot (held until the body ends, however it ends); its
    wall-time limit counts from admission."""

    async def admitted_body(instance: Instance) -> str:
        async with admission:
            instance.restart_wall_clock()
            return await body(instance)

    return admitted_body


def _program_body(program: Program, input: str, sandbox: SandboxPolicy | None) -> Body:
    """Run a resolved program with `input` (JSON text) through the inferlet runner (in a sandbox if set)."""

    async def body(instance: Instance) -> str:
        from pie.runtime import runner

        assert instance.host is not None
        return await runner.run(program, input, instance.host, instance.emit, sandbox=sandbox)

    return body
