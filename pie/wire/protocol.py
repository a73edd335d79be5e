"""The client <-> server wire protocol, wire-compatible with the `pie-client` 0.5.x package.

Every frame is one binary WebSocket message holding one msgpack map tagged by
`type`. Requests that expect an answer carry an integer `corr_id` and are
answered by exactly one `response {corr_id, ok, result}`; `signal_process` and
`transfer_file` are fire-and-forget. A running process streams
`process_event {process_id, event, value}` frames and, for files it sends,
`file` frames in 256 KiB chunks checked by blake3.

Messages are frozen dataclasses; `decode_client` / `decode_server` turn a frame
into one, checking every field's presence and type, and `encode` does the
reverse. A bad frame raises `FrameError`, which carries the frame's `corr_id`
when one could be read, so the server can answer that request and keep the
connection (and every other client) going.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import msgpack

from pie.errors import ProtocolError

CHUNK_SIZE = 256 * 1024  # pie-client's upload and download chunk size
WS_PATH = "/v1/ws"
# Every field of every message is a scalar, so a frame needs little structure. These bound what a
# hostile frame can make the decoder build (msgpack's own caps default to the frame's length).
MAX_FRAME_DEPTH = 8  # containers inside containers, the top-level map included
MAX_FRAME_KEYS = 64  # keys of one map (messages have at most 9; newer clients may add a few)
MAX_FRAME_ITEMS = 1024  # items of one array (no message has one)


class FrameError(ProtocolError):
    """A frame that is not a valid message. `corr_id` is set when the frame named one."""

    def __init__(self, message: str, corr_id: int | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.corr_id = corr_id
        self.kind = kind  # the frame's `type`, when it had a string one


# -- client -> server ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthIdentify:
    TYPE: ClassVar[str] = "auth_identify"
    corr_id: int
    username: str


@dataclass(frozen=True, slots=True)
class AuthProve:
    """The base64 signature of the raw challenge bytes `auth_identify` answered with."""

    TYPE: ClassVar[str] = "auth_prove"
    corr_id: int
    signature: str


@dataclass(frozen=True, slots=True)
class AuthByToken:
    """The server's per-start internal token (used by `pie run` and local tools)."""

    TYPE: ClassVar[str] = "auth_by_token"
    corr_id: int
    token: str
    username: str | None = None  # who to act as; the token holder is the operator


@dataclass(frozen=True, slots=True)
class Query:
    TYPE: ClassVar[str] = "query"
    corr_id: int
    subject: str
    record: str = ""


@dataclass(frozen=True, slots=True)
class CheckProgram:
    TYPE: ClassVar[str] = "check_program"
    corr_id: int
    name: str
    version: str | None = None


@dataclass(frozen=True, slots=True)
class AddProgram:
    """One chunk of a program upload; answered once, after the last chunk."""

    TYPE: ClassVar[str] = "add_program"
    corr_id: int
    program_hash: str  # blake3 hex of the whole program
    manifest: str  # Pie.toml text
    chunk_index: int
    total_chunks: int
    chunk_data: bytes
    force_overwrite: bool = False


@dataclass(frozen=True, slots=True)
class LaunchProcess:
    TYPE: ClassVar[str] = "launch_process"
    corr_id: int
    inferlet: str  # name or name@version
    input: str = "{}"  # JSON text handed to the inferlet's main
    capture_outputs: bool = True  # stream this process's events to the launching connection
    token_budget: int | None = None


@dataclass(frozen=True, slots=True)
class LaunchDaemon:
    TYPE: ClassVar[str] = "launch_daemon"
    corr_id: int
    inferlet: str
    port: int
    input: str = "{}"


@dataclass(frozen=True, slots=True)
class AttachProcess:
    TYPE: ClassVar[str] = "attach_process"
    corr_id: int
    process_id: str


@dataclass(frozen=True, slots=True)
class ListProcesses:
    TYPE: ClassVar[str] = "list_processes"
    corr_id: int


@dataclass(frozen=True, slots=True)
class SignalProcess:
    """A message for the inferlet's `session.receive()`; no reply."""

    TYPE: ClassVar[str] = "signal_process"
    process_id: str
    message: str


@dataclass(frozen=True, slots=True)
class TerminateProcess:
    TYPE: ClassVar[str] = "terminate_process"
    corr_id: int
    process_id: str


@dataclass(frozen=True, slots=True)
class TransferFile:
    """One chunk of a file for the inferlet's `session.receive_file()`; no reply."""

    TYPE: ClassVar[str] = "transfer_file"
    process_id: str
    file_hash: str  # blake3 hex of the whole file
    chunk_index: int
    total_chunks: int
    chunk_data: bytes


@dataclass(frozen=True, slots=True)
class Ping:
    TYPE: ClassVar[str] = "ping"
    corr_id: int


@dataclass(frozen=True, slots=True)
class RegisterMcpServer:
    """An MCP server the client runs, offered to the inferlets this connection launches (Pie's wire form)."""

    TYPE: ClassVar[str] = "register_mcp_server"
    corr_id: int
    name: str
    transport: str = "stdio"
    command: str | None = None
    args: list | None = None  # of str (a bare `list`: the codec checks isinstance against it)
    url: str | None = None


@dataclass(frozen=True, slots=True)
class McpResponse:
    """The client's answer to an `mcp_request`: the JSON-RPC result, or the error {code, message, data},
    as JSON text."""

    TYPE: ClassVar[str] = "mcp_response"
    corr_id: int
    ok: bool
    result: str


ClientMessage = (
    AuthIdentify | AuthProve | AuthByToken | Query | CheckProgram | AddProgram | LaunchProcess
    | LaunchDaemon | AttachProcess | ListProcesses | SignalProcess | TerminateProcess | TransferFile | Ping
    | RegisterMcpServer | McpResponse
)
AUTH_MESSAGES = (AuthIdentify, AuthProve, AuthByToken)
AUTH_TYPES = frozenset(cls.TYPE for cls in AUTH_MESSAGES)

# -- server -> client ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Response:
    TYPE: ClassVar[str] = "response"
    corr_id: int
    ok: bool
    result: str


@dataclass(frozen=True, slots=True)
class ProcessEvent:
    TYPE: ClassVar[str] = "process_event"
    process_id: str
    event: str  # stdout | stderr | message | return | error (files travel as FileChunk)
    value: str


@dataclass(frozen=True, slots=True)
class FileChunk:
    TYPE: ClassVar[str] = "file"
    process_id: str
    file_hash: str
    chunk_index: int
    total_chunks: int
    chunk_data: bytes
    name: str | None = None


@dataclass(frozen=True, slots=True)
class ProtocolErrorMessage:
    """A frame was refused and named no `corr_id` to answer. pie-client ignores this type."""

    TYPE: ClassVar[str] = "protocol_error"
    message: str


@dataclass(frozen=True, slots=True)
class McpRequest:
    """An inferlet's call to one of the client's MCP servers; answered by `mcp_response` with this corr_id
    (the server's own numbering, apart from the client's). `params`: JSON text."""

    TYPE: ClassVar[str] = "mcp_request"
    corr_id: int
    server_name: str
    method: str
    params: str


ServerMessage = Response | ProcessEvent | FileChunk | ProtocolErrorMessage | McpRequest
Message = ClientMessage | ServerMessage


def _registry(union: Any) -> dict[str, type]:
    return {cls.TYPE: cls for cls in typing.get_args(union)}


CLIENT_TYPES: dict[str, type] = _registry(ClientMessage)
SERVER_TYPES: dict[str, type] = _registry(ServerMessage)

# -- codec ----------------------------------------------------------------------------------------


def encode(message: Message) -> bytes:
    fields = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
    return msgpack.packb({"type": message.TYPE, **fields}, use_bin_type=True)


def decode_client(frame: bytes) -> ClientMessage:
    return _decode(frame, CLIENT_TYPES)  # type: ignore[no-any-return,unused-ignore]


def decode_server(frame: bytes) -> ServerMessage:
    return _decode(frame, SERVER_TYPES)  # type: ignore[no-any-return,unused-ignore]


def _decode(frame: bytes, registry: dict[str, type]) -> Any:
    try:
        raw = msgpack.unpackb(frame, raw=False, max_map_len=MAX_FRAME_KEYS, max_array_len=MAX_FRAME_ITEMS,
                              max_ext_len=0, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as error:  # ExtraData/FormatError/StackError are ValueErrors
        raise FrameError(f"frame is not a msgpack message within the limits ({str(error) or type(error).__name__}; "
                         f"maps of at most {MAX_FRAME_KEYS} keys, arrays of {MAX_FRAME_ITEMS} items, no ext "
                         "types); send one msgpack map per frame") from None
    if not isinstance(raw, dict):
        raise FrameError(f"frame holds a msgpack {type(raw).__name__}, expected a map with a `type` key")
    corr_id = raw.get("corr_id")
    corr_id = corr_id if isinstance(corr_id, int) and not isinstance(corr_id, bool) else None
    kind = raw.get("type")
    kind = kind if isinstance(kind, str) else None
    _check_depth(raw, corr_id, kind)
    cls = registry.get(kind) if kind is not None else None
    if cls is None:
        known = ", ".join(sorted(registry))
        raise FrameError(f"unknown message type {kind!r}; known types: {known}", corr_id, kind)
    try:
        return cls(**_fields(cls, raw))
    except (TypeError, ValueError) as error:
        raise FrameError(f"bad `{kind}` message: {error}", corr_id, kind) from None


def _check_depth(raw: dict[Any, Any], corr_id: int | None, kind: str | None) -> None:
    """Refuse frames nested deeper than MAX_FRAME_DEPTH (iteratively; msgpack itself allows 1024)."""
    stack: list[tuple[Any, int]] = [(raw, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth >= MAX_FRAME_DEPTH:
                    raise FrameError(f"frame is nested deeper than {MAX_FRAME_DEPTH} levels; message fields are "
                                     "plain values", corr_id, kind)
                stack.append((child, depth + 1))


def _fields(cls: type, raw: dict[Any, Any]) -> dict[str, Any]:
    """The dataclass's fields taken from `raw`, each checked against its annotation. Extra keys are ignored
    so that newer clients can add fields."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            if f.default is dataclasses.MISSING:
                raise ValueError(f"missing field `{f.name}`")
            continue
        value = raw[f.name]
        if not _matches(value, hints[f.name]):
            raise ValueError(f"field `{f.name}` is {type(value).__name__} {_short(value)}, expected {_type_name(hints[f.name])}")
        out[f.name] = value
    return out


def _matches(value: Any, hint: Any) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is Union:
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is bytes:
        return isinstance(value, bytes | bytearray)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is Union:
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    return "nil" if hint is type(None) else hint.__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
