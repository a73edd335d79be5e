"""Chunked payloads: splitting for sending, reassembly with blake3 checks for receiving.

Program uploads, files sent to an inferlet and files an inferlet sends all
travel as `CHUNK_SIZE` pieces with `chunk_index`/`total_chunks`, keyed by the
blake3 hex digest of the whole payload (pie-client's scheme). Chunks of one
payload arrive in order on one connection; several payloads may interleave.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import blake3

from pie.errors import ProtocolError
from pie.wire.protocol import CHUNK_SIZE


def split(data: bytes, chunk_size: int = CHUNK_SIZE) -> list[bytes]:
    """`data` in chunks; an empty payload is one empty chunk (pie-client sends it so)."""
    if not data:
        return [b""]
    return [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]


def digest(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


@dataclass
class _Partial:
    total_chunks: int
    next_index: int = 0
    parts: list[bytes] = field(default_factory=list)
    size: int = 0


class Reassembler:
    """In-flight chunked payloads of one connection, bounded in size and count."""

    def __init__(self, *, max_bytes: int, max_in_flight: int = 16) -> None:
        self.max_bytes = max_bytes
        self.max_in_flight = max_in_flight
        self._partials: dict[str, _Partial] = {}

    def feed(self, key: str, index: int, total: int, data: bytes) -> bytes | None:
        """Add one chunk; the whole payload after its last chunk, else None. On any error the payload is
        dropped and `ProtocolError` says why."""
        try:
            return self._feed(key, index, total, data)
        except ProtocolError:
            self._partials.pop(key, None)
            raise

    def _feed(self, key: str, index: int, total: int, data: bytes) -> bytes | None:
        partial = self._partials.get(key)
        if partial is None:
            partial = self._start(key, index, total)
        if total != partial.total_chunks:
            raise ProtocolError(f"chunk {index} of {key[:16]} says total_chunks={total}, the first said "
                                f"{partial.total_chunks}; keep total_chunks the same on every chunk")
        if index != partial.next_index:
            raise ProtocolError(f"chunk {index} of {key[:16]} arrived when chunk {partial.next_index} was "
                                "expected; send chunks in order")
        partial.size += len(data)
        if partial.size > self.max_bytes:
            raise ProtocolError(f"payload {key[:16]} is over {partial.size} bytes, the limit is "
                                f"{self.max_bytes}; send a smaller payload")
        partial.parts.append(bytes(data))
        partial.next_index += 1
        if partial.next_index < partial.total_chunks:
            return None
        del self._partials[key]
        return b"".join(partial.parts)

    def _start(self, key: str, index: int, total: int) -> _Partial:
        if total < 1:
            raise ProtocolError(f"total_chunks is {total}; a payload has at least 1 chunk")
        if index != 0:
            raise ProtocolError(f"payload {key[:16]} starts at chunk {index}; the first chunk index is 0")
        if len(self._partials) >= self.max_in_flight:
            raise ProtocolError(f"{len(self._partials)} uploads already in flight on this connection, the "
                                f"limit is {self.max_in_flight}; finish one first")
        partial = _Partial(total_chunks=total)
        self._partials[key] = partial
        return partial


def check_digest(data: bytes, expected: str, what: str) -> None:
    actual = digest(data)
    if actual != expected.lower():
        raise ProtocolError(f"{what}: blake3 of the {len(data)} received bytes is {actual}, the sender said "
                            f"{expected}; the payload was corrupted or mis-hashed, send it again")
