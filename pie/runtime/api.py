"""The runtime's two faces: what the server calls, and what the runtime calls on an engine.

Server -> runtime: `RuntimeAPI` (launch, attach, list, terminate) and
`ProcessAPI` (one running inferlet: its event stream and its inbox).
Runtime -> engine: `EngineClient`, an async wrapper over `Engine.forward_batch`
that runs in a thread (in-process) or in an engine worker process.

Torch-free: these are Protocols and plain dataclasses only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from pie.engine.batch import BatchResult, ForwardBatch

if TYPE_CHECKING:
    from pie.runtime.mcp import McpRelay

EventKind = Literal["stdout", "stderr", "message", "file", "return", "error"]
FINAL_EVENTS: frozenset[str] = frozenset({"return", "error"})
ProcessStatus = Literal["running", "finished", "failed", "terminated"]


@dataclass(frozen=True, slots=True)
class Event:
    """One thing a process emitted. `return` and `error` are final: nothing follows them."""

    kind: EventKind
    value: str | bytes


@dataclass(frozen=True)
class ModelStatus:
    name: str
    model_type: str
    device: str
    pages_total: int
    pages_used: int
    tokens_processed: int
    batches: int
    last_batch_ms: float


@dataclass(frozen=True)
class ProgramInfo:
    name: str
    version: str
    description: str = ""
    parameters: dict[str, dict[str, object]] = field(default_factory=dict)


class ProcessAPI(Protocol):
    id: str
    program: str  # name@version
    username: str
    status: ProcessStatus
    started_at: float  # time.time() at launch (list_processes reports elapsed_secs)
    ended_at: float | None  # time.time() at the final event; None while running
    input: str  # the launch input (JSON text)

    def events(self) -> AsyncIterator[Event]:
        """Events not yet delivered to any subscriber (buffered while detached), then live ones, ending after
        the final event. One subscriber at a time; a new one (attach) takes over."""
        ...

    def send_message(self, message: str) -> None: ...  # -> the inferlet's session.receive()
    def send_file(self, data: bytes) -> None: ...  # -> the inferlet's session.receive_file()
    async def terminate(self, reason: str = "terminated by client") -> None: ...
    async def wait(self) -> Event: ...  # the final event


class RuntimeAPI(Protocol):
    def models(self) -> list[ModelStatus]: ...
    def programs(self, username: str | None = None) -> list[ProgramInfo]: ...  # what `username` can launch
    def has_program(self, spec: str, username: str | None = None) -> bool: ...  # "name" or "name@version"
    def add_program(self, name: str, version: str, files: dict[str, bytes], manifest: str, *, owner: str,
                    force: bool = False) -> ProgramInfo: ...  # lands in `owner`'s namespace only
    def standard_program(self, name: str) -> str: ...  # the standard inferlet pinned by its content hash
    async def launch(self, program: str, input: str, *, username: str, token_budget: int | None = None,
                     mcp_session: McpRelay | None = None) -> ProcessAPI: ...
    def process(self, process_id: str) -> ProcessAPI | None: ...
    def processes(self, username: str | None = None) -> list[ProcessAPI]: ...
    async def shutdown(self, grace_s: float) -> None: ...


class EngineClient(Protocol):
    """One model's engine (one data-parallel group). Calls are serialised: one batch in flight."""

    @property
    def info(self) -> object: ...  # pie.engine.engine.EngineInfo (plain data)

    async def forward(self, batch: ForwardBatch) -> BatchResult: ...
    async def copy_pages(self, src: list[int], dst: list[int]) -> None: ...
    async def close(self) -> None: ...
