"""The wire codec and chunked payloads: what pie-client sends decodes, what is malformed is refused with
the request's corr_id where it has one."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from pie.errors import ProtocolError
from pie.wire import protocol
from pie.wire.chunks import Reassembler, check_digest, digest, split
from pie.wire.protocol import CHUNK_SIZE, FrameError


def _sample(cls: type) -> object:
    """An instance of a message class with a value of the right type in every field."""
    values = {"int": 7, "str": "x", "bool": True, "bytes": b"\x00\x01", "int | None": 3, "str | None": "y",
              "list | None": ["a", "b"]}
    return cls(**{f.name: values[str(f.type)] for f in dataclasses.fields(cls)})


@pytest.mark.parametrize("cls", [*protocol.CLIENT_TYPES.values(), *protocol.SERVER_TYPES.values()],
                         ids=lambda c: c.TYPE)
def test_every_message_round_trips(cls: type) -> None:
    message = _sample(cls)
    frame = protocol.encode(message)  # type: ignore[arg-type]
    decode = protocol.decode_client if cls.TYPE in protocol.CLIENT_TYPES else protocol.decode_server
    assert decode(frame) == message
    assert msgpack.unpackb(frame)["type"] == cls.TYPE


def test_decodes_frames_as_pie_client_builds_them() -> None:
    # Exactly the maps pie_client.PieClient sends (launch_process, add_program chunk, transfer_file).
    launch = {"type": "launch_process", "inferlet": "text-completion@0.1.0", "input": '{"prompt": "hi"}',
              "capture_outputs": True, "corr_id": 4}
    assert protocol.decode_client(msgpack.packb(launch, use_bin_type=True)) == protocol.LaunchProcess(
        4, "text-completion@0.1.0", '{"prompt": "hi"}', True, None)
    upload = {"type": "add_program", "program_hash": "ab", "manifest": "[package]", "force_overwrite": False,
              "corr_id": 5, "total_chunks": 1, "chunk_index": 0, "chunk_data": b"print(1)"}
    assert protocol.decode_client(msgpack.packb(upload, use_bin_type=True)).chunk_data == b"print(1)"
    signal = {"type": "signal_process", "process_id": "p", "message": "go"}
    assert protocol.decode_client(msgpack.packb(signal, use_bin_type=True)) == protocol.SignalProcess("p", "go")


@pytest.mark.parametrize(("frame", "corr_id", "words"), [
    (b"\xc1garbage", None, "not a msgpack"),
    (msgpack.packb([1, 2]), None, "msgpack list"),
    (msgpack.packb({"corr_id": 9}), 9, "unknown message type None"),
    (msgpack.packb({"type": "launch_rocket", "corr_id": 9}), 9, "unknown message type 'launch_rocket'"),
    (msgpack.packb({"type": "launch_process", "corr_id": 9}), 9, "missing field `inferlet`"),
    (msgpack.packb({"type": "launch_process", "corr_id": 9, "inferlet": 5}), 9, "`inferlet` is int 5"),
    (msgpack.packb({"type": "ping", "corr_id": "9"}), None, "`corr_id` is str"),
    (msgpack.packb({"type": "ping", "corr_id": True}), None, "`corr_id` is bool"),
])
def test_malformed_frames_are_refused_with_their_corr_id(frame: bytes, corr_id: int | None, words: str) -> None:
    with pytest.raises(FrameError, match=words) as caught:
        protocol.decode_client(frame)
    assert caught.value.corr_id == corr_id


def test_extra_fields_are_ignored() -> None:
    frame = msgpack.packb({"type": "ping", "corr_id": 1, "from_the_future": [1, 2]})
    assert protocol.decode_client(frame) == protocol.Ping(1)


def test_split_and_reassemble_a_multi_chunk_payload() -> None:
    data = bytes(range(256)) * 2500  # 640,000 bytes: 3 chunks
    chunks = split(data)
    assert [len(c) for c in chunks] == [CHUNK_SIZE, CHUNK_SIZE, len(data) - 2 * CHUNK_SIZE]
    assert split(b"") == [b""]
    assembler = Reassembler(max_bytes=10**6)
    key = digest(data)
    results = [assembler.feed(key, i, len(chunks), c) for i, c in enumerate(chunks)]
    assert results[:-1] == [None, None] and results[-1] == data
    check_digest(data, key, "upload")


def test_reassembly_refuses_bad_sequences_and_drops_the_payload() -> None:
    assembler = Reassembler(max_bytes=100, max_in_flight=1)
    with pytest.raises(ProtocolError, match="starts at chunk 1"):
        assembler.feed("k", 1, 2, b"a")
    assembler.feed("k", 0, 3, b"a")
    with pytest.raises(ProtocolError, match=r"chunk 2 .* when chunk 1 was expected"):
        assembler.feed("k", 2, 3, b"c")
    assert assembler.feed("k", 0, 1, b"fresh") == b"fresh"  # the broken payload was dropped, a new one works
    with pytest.raises(ProtocolError, match="limit is 100"):
        assembler.feed("big", 0, 2, b"x" * 101)
    assembler.feed("a", 0, 2, b"x")
    with pytest.raises(ProtocolError, match="already in flight"):
        assembler.feed("b", 0, 2, b"x")
    with pytest.raises(ProtocolError, match="total_chunks=3, the first said 2"):
        assembler.feed("a", 1, 3, b"x")


def test_digest_mismatch_names_both_hashes() -> None:
    with pytest.raises(ProtocolError, match=f"blake3 of the 3 received bytes is {digest(b'abc')}"):
        check_digest(b"abc", digest(b"abd"), "file")
