"""`Runtime`: what the server runs (`pie.runtime.api.RuntimeAPI`).

    runtime = await Runtime.start(config)
    process = await runtime.launch("text-completion", '{"prompt": "hi"}', username="alice")
    final = await process.wait()

Per model it builds one engine client, a page pool, a prefix trie, a
snapshot store and a scheduler (`ModelRuntime`). Instances are launched from
the program registry and run by the inferlet runner; `spawn` runs any body
coroutine as an instance (tests, and hosts of programs from other sources).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pie.engine.config import EngineConfig
from pie.errors import ConfigError, ModelNotFoundError, RequestError
from pie.runtime.api import EngineClient, ModelStatus, ProgramInfo
from pie.runtime.context import ContextSpace
from pie.runtime.host import InstanceHost
from pie.runtime.instance import Body, Instance, InstanceLimits
from pie.runtime.messaging import MessageBus
from pie.runtime.pages import PagePool
from pie.runtime.prefix_trie import PrefixTrie
from pie.runtime.scheduler import Scheduler
from pie.runtime.snapshots import SnapshotStore

if TYPE_CHECKING:
    from pie.runtime.programs import Program, ProgramRegistry
    from pie.runtime.sandbox.policy import SandboxPolicy
    from pie.runtime.tokenizer import ModelTokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeLimits:
    """[runtime] limits; 0 means no limit."""

    max_pages_per_instance: int = 0
    max_tokens_per_instance: int = 0  # sampled tokens; a launch's token_budget can only lower it
    max_wall_time_s: float = 0.0
    page_wait_timeout_s: float = 30.0  # a pass waiting for pages while nothing can run fails after this
    max_buffered_events: int = 10_000
    max_finished_processes: int = 1024  # finished instances kept for late attach / wait

    def for_instance(self, token_budget: int | None) -> InstanceLimits:
        tokens = self.max_tokens_per_instance
        if token_budget is not None:
            tokens = min(tokens, token_budget) if tokens else token_budget
        return InstanceLimits(self.max_pages_per_instance, tokens, self.max_wall_time_s, self.max_buffered_events)


@dataclass(frozen=True)
class ModelSpec:
    name: str  # what inferlets pass to Model.load
    engine: EngineConfig


@dataclass(frozen=True)
class RuntimeConfig:
    models: tuple[ModelSpec, ...]
    limits: RuntimeLimits = field(default_factory=RuntimeLimits)
    inferlet_paths: tuple[Path, ...] = ()  # searched after the standard library and ~/.pie/inferlets
    pie_home: Path | None = None
    sandbox: SandboxPolicy | None = None  # isolated mode: each launched program runs in a sandbox process
    freeze_gc: bool = True  # move startup objects out of the collector's sight (see Runtime.start)

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("no models configured: add a [[model]] section")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ConfigError(f"model names must be unique, got {names}")


class ModelRuntime:
    """One served model: its engine client and everything that manages that engine's KV pages."""

    def __init__(self, name: str, engine: EngineClient, limits: RuntimeLimits, *, owns_engine: bool = True) -> None:
        info: Any = engine.info
        self.name = name
        self.engine = engine
        self.owns_engine = owns_engine  # close the engine with the runtime
        self.info = info
        self.page_size: int = info.page_size
        self.vocab_size: int = info.vocab_size
        self.max_batch_tokens: int = info.max_batch_tokens
        self.max_dist_size: int = info.max_dist_size
        self.max_num_embeds: int = info.max_num_embeds
        self.pool = PagePool(info.num_pages)
        self.trie = PrefixTrie(self.pool)
        self.space = ContextSpace(self.pool, self.trie, self.page_size)
        self.snapshots = SnapshotStore(self.space, name)
        self.scheduler = Scheduler(engine, self.space, max_batch_tokens=info.max_batch_tokens,
                                   max_batch_size=info.max_batch_size,
                                   page_wait_timeout_s=limits.page_wait_timeout_s)

    @cached_property
    def tokenizer(self) -> ModelTokenizer:
        from pie.runtime.tokenizer import ModelTokenizer

        return ModelTokenizer(self.info.model_dir)

    def describe(self) -> dict[str, Any]:
        """`Host.model_info`: the tokenizer's facts plus the engine's (vocab_size = logits length).

        A checkpoint without a tokenizer (benchmarks' dummy models) still describes its engine;
        tokenizer calls on it fail with the reason."""
        try:
            facts = dict(self.tokenizer.info())
        except ModelNotFoundError:
            facts = {"stop_tokens": [], "chat_template": False}
        facts["tokenizer_vocab_size"] = facts.get("vocab_size")
        return facts | {
            "name": self.name, "model_type": self.info.model_type, "page_size": self.page_size,
            "vocab_size": self.vocab_size, "num_pages": self.pool.num_pages,
            "max_batch_tokens": self.max_batch_tokens, "max_dist_size": self.max_dist_size,
            "max_num_embeds": self.max_num_embeds, "system_speculation": False,
        }

    def status(self) -> ModelStatus:
        stats = self.scheduler.stats
        return ModelStatus(self.name, self.info.model_type, self.info.device, self.pool.num_pages,
                           self.pool.num_used, stats.tokens_processed, stats.batches, stats.last_batch_ms)

    async def close(self) -> None:
        await self.scheduler.close()
        self.snapshots.clear()
        if self.owns_engine:
            await self.engine.close()


class Runtime:
    def __init__(self, models: Mapping[str, ModelRuntime], limits: RuntimeLimits,
                 registry: ProgramRegistry | None = None, sandbox: SandboxPolicy | None = None) -> None:
        assert models, "a runtime serves at least one model"
        self._models = dict(models)
        self.default_model = next(iter(self._models))
        self.limits = limits
        self.sandbox = sandbox
        self.bus = MessageBus()
        self._registry = registry
        self._processes: dict[str, Instance] = {}
        self._finished: collections.deque[str] = collections.deque()  # ids of ended instances, oldest first
        self._closing = False
        self._froze_gc = False

    @classmethod
    async def start(cls, config: Any, *, engines: Mapping[str, EngineClient] | None = None) -> Runtime:
        """Build the runtime. `engines` (by model name) are used instead of starting an in-process engine
        for those models; the caller keeps them (shutdown does not close them)."""
        from pie.runtime.engine_client import InProcessEngine
        from pie.runtime.programs import ProgramRegistry, default_search_paths

        cfg = runtime_config(config)
        given = dict(engines or {})
        started: dict[str, EngineClient] = {}
        try:
            for spec in cfg.models:
                if spec.name not in given:
                    started[spec.name] = await InProcessEngine.start(spec.engine, spec.name)
        except BaseException:
            for engine in started.values():
                await engine.close()
            raise
        models = {s.name: ModelRuntime(s.name, given.get(s.name) or started[s.name], cfg.limits,
                                       owns_engine=s.name in started) for s in cfg.models}
        registry = ProgramRegistry(default_search_paths(cfg.pie_home, cfg.inferlet_paths))
        runtime = cls(models, cfg.limits, registry, cfg.sandbox)
        if cfg.freeze_gc:
            # The hundreds of thousands of objects of torch, transformers and the model live as long as
            # the server; full collections scanning them cost ~40% of the per-step runtime overhead with
            # 256 instances. Frozen, the collector only walks what serving creates (undone at shutdown;
            # no collection first: it would add 0.1 s to every start for a little startup garbage).
            gc.freeze()
            runtime._froze_gc = True
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

    def programs(self) -> list[ProgramInfo]:
        return self.registry.programs()

    def has_program(self, spec: str) -> bool:
        return self.registry.has(spec)

    def add_program(self, name: str, version: str, files: dict[str, bytes], manifest: str, *,
                    force: bool = False) -> ProgramInfo:
        return self.registry.add(name, version, files, manifest, force=force)

    # -- processes ------------------------------------------------------------------------------

    async def launch(self, program: str, input: str, *, username: str,
                     token_budget: int | None = None) -> Instance:
        resolved = self.registry.resolve(program)
        return self.spawn(_program_body(resolved, input, self.sandbox), program=resolved.spec,
                          username=username, token_budget=token_budget)

    def spawn(self, body: Body, *, program: str, username: str, token_budget: int | None = None) -> Instance:
        """Run `body(instance)` as a new instance with its own host; returns at once."""
        if self._closing:
            raise RequestError("the server is shutting down; launch again once it is back")
        instance = Instance(str(uuid.uuid4()), program, username, self.limits.for_instance(token_budget))
        instance.host = InstanceHost(instance, self._models, self.default_model, self.bus.mailbox(username))
        self._processes[instance.id] = instance
        instance.start(body, on_exit=self._on_exit)
        return instance

    def process(self, process_id: str) -> Instance | None:
        return self._processes.get(process_id)

    def processes(self, username: str | None = None) -> list[Instance]:
        return [p for p in self._processes.values() if username is None or p.username == username]

    def _on_exit(self, instance: Instance) -> None:
        self._finished.append(instance.id)
        while len(self._finished) > self.limits.max_finished_processes:
            self._processes.pop(self._finished.popleft(), None)

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
        if self._froze_gc:
            gc.unfreeze()
            self._froze_gc = False

    def check_integrity(self) -> None:
        for model in self._models.values():
            model.space.check_integrity()


def runtime_config(config: Any) -> RuntimeConfig:
    """A `RuntimeConfig`, or anything shaped like `pie.config.Config` (models with name + engine config)."""
    if isinstance(config, RuntimeConfig):
        return config
    models = tuple(ModelSpec(m.name, m.engine_config() if callable(getattr(m, "engine_config", None))
                             else m.engine) for m in config.models)
    runtime = getattr(config, "runtime", None)
    fields = RuntimeLimits.__dataclass_fields__
    limits = RuntimeLimits(**{k: getattr(runtime, k) for k in fields if hasattr(runtime, k)})
    paths = tuple(Path(p) for p in getattr(runtime, "inferlet_paths", ()) or ())
    return RuntimeConfig(models, limits, paths, getattr(config, "pie_home", None))


def _program_body(program: Program, input: str, sandbox: SandboxPolicy | None) -> Body:
    """Run a resolved program with `input` (JSON text) through the inferlet runner (in a sandbox if set)."""

    async def body(instance: Instance) -> str:
        from pie.runtime import runner

        assert instance.host is not None
        return await runner.run(program, input, instance.host, instance.emit, sandbox=sandbox)

    return body
