"""Frames between the runtime and a sandbox: a 4-byte big-endian length, then one msgpack map.

msgpack carries exactly the Host API's plain data (str, bytes, int, float, bool, None, lists, maps);
nothing is ever unpickled. A frame over `MAX_FRAME_BYTES` is refused on both sides, so a garbage
length cannot make either side allocate without bound.

Messages (`t` is the type):

    runtime -> sandbox   start {program, input}         the one program to run
                         reply {id, ok, v | e}          a host call's result or error message
    sandbox -> runtime   call {id, m, a}                a host call (method name, argument list)
                         cancel {id}                    the sandbox stopped waiting for call `id`
                         event {k, v}                   stdout / stderr / message / file output
                         done {ok, v}                   the program's result text, or its error
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import msgpack

from pie.errors import ProtocolError

MAX_FRAME_BYTES = 256 * 1024 * 1024
_HEADER = struct.Struct(">I")


def pack(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(f"a sandbox frame of {len(body)} bytes is over the {MAX_FRAME_BYTES} byte limit")
    return _HEADER.pack(len(body)) + body


def unpack(body: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise ProtocolError(f"a sandbox frame is not msgpack: {e}") from None
    if not isinstance(message, dict) or not isinstance(message.get("t"), str):
        raise ProtocolError("a sandbox frame must be a map with a string `t`")
    return message


def _length(header: bytes) -> int:
    (n,) = _HEADER.unpack(header)
    if n > MAX_FRAME_BYTES:
        raise ProtocolError(f"a sandbox frame announces {n} bytes, over the {MAX_FRAME_BYTES} byte limit")
    return int(n)


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None at a clean end of stream."""
    try:
        header = await reader.readexactly(_HEADER.size)
        return unpack(await reader.readexactly(_length(header)))
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise ProtocolError("the sandbox connection ended inside a frame") from None
        return None


def recv_frame(sock: socket.socket) -> dict[str, Any] | None:
    """Blocking read of the next message (the sandbox's reader thread); None at end of stream."""
    header = _recv_exactly(sock, _HEADER.size)
    if header is None:
        return None
    body = _recv_exactly(sock, _length(header))
    if body is None:
        raise ProtocolError("the runtime connection ended inside a frame")
    return unpack(body)


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    """n bytes; None if the stream ends before the first byte."""
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            if got == 0:
                return None
            raise ProtocolError(f"the connection ended after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
