"""The engine worker: one process per tensor-parallel rank.

    RANK=1 WORLD_SIZE=2 LOCAL_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 python -m pie.engine.worker

Every rank joins the group from the torchrun-style environment (ranks on other
hosts join the same way, see docs/parallelism.md). Rank 0 is started by the
server (`pie.runtime.worker_client.WorkerEngine`) with `--server-fd`, one end
of a socketpair, and `--store-fd`, the rendezvous socket the server has bound
at MASTER_PORT (rank 0 serves torch.distributed's store on it). It reads each
request from the server's socket, broadcasts it to the other ranks over the
control group, and every rank executes it on its own `Engine` (same batch,
same collectives); rank 0 sends the reply.

Messages (`pie.engine.wire`, msgpack lists):

    server -> rank 0   ["start", EngineConfig]            first, once
                       ["forward", ForwardBatch]  ["copy_pages", src, dst]  ["close"]
    rank 0 -> server   ["ready", EngineInfo]              after every rank has loaded the model
                       ["ok", value]                      BatchResult for forward, None otherwise
                       ["error", class name, message]     a pie error before device work (BatchError, ...):
                                                          every rank raised it, the workers keep serving
                       ["fatal", message]                 anything else: the group exits (the ranks'
                                                          collectives can no longer be trusted to line up)
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from pie.engine import parallel, wire
from pie.engine.config import EngineConfig
from pie.errors import PieError, ProtocolError

if TYPE_CHECKING:
    from pie.engine.engine import Engine

DEVICE_ENV = "PIE_DEVICE"  # this rank's device (WorkerEngine sets it); else cuda:LOCAL_RANK / the config's


class Fatal(Exception):
    """The group cannot go on: reported to the server, then every rank exits."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pie.engine.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--server-fd", type=int, default=None,
                        help="rank 0 only: the file descriptor of the server's socket (WorkerEngine passes it)")
    parser.add_argument("--store-fd", type=int, default=None,
                        help="rank 0 only: a socket listening at MASTER_PORT to serve the rendezvous store on "
                             "(WorkerEngine passes it); without it rank 0 binds MASTER_PORT itself")
    args = parser.parse_args(argv)
    rank = parallel.env_rank()[0]
    if (rank == 0) != (args.server_fd is not None):
        print(f"pie engine worker: rank {rank}: rank 0 is started by the pie server with --server-fd; "
              f"start ranks >= 1 without it (see docs/parallelism.md)", file=sys.stderr)
        return 2
    server = Connection(args.server_fd) if args.server_fd is not None else None
    try:
        return _run(server, args.store_fd)
    except Fatal as e:
        print(f"pie engine worker rank {rank}: {e}", file=sys.stderr)
        if server is not None:
            _send(server, ["fatal", f"rank {rank}: {e}"])
        return 1
    finally:
        parallel.shutdown()


def _run(server: Connection | None, store_fd: int | None) -> int:
    member = parallel.join_from_env(store_fd)
    config = _agree_on_config(member, server)
    engine = _build_engine(member, config, server)
    try:
        parallel.barrier(member)  # every rank has its engine: the first batch will not wait on a loader
    except RuntimeError as e:
        raise Fatal(f"a rank failed while loading the model (see its log): {e}") from e
    if server is not None:
        _send(server, ["ready", engine.info])
    while True:
        message = _next_message(member, server)
        reply = _execute(engine, message)
        if server is not None:
            _send(server, reply)
        if message[0] == "close":
            return 0


def _agree_on_config(member: parallel.Membership, server: Connection | None) -> EngineConfig:
    """Rank 0 reads ["start", config] from the server and broadcasts it; the others receive it."""
    data = server.recv_bytes() if server is not None else None
    data = member.control.broadcast(data)
    op, *rest = wire.decode(data)
    if op != "start" or len(rest) != 1 or not isinstance(rest[0], EngineConfig):
        raise Fatal(f"expected ['start', EngineConfig] first, got op {op!r}")
    config: EngineConfig = rest[0]
    if config.tensor_parallel_size != member.world_size:
        raise Fatal(f"tensor_parallel_size = {config.tensor_parallel_size} but WORLD_SIZE = {member.world_size}; "
                    "start exactly tensor_parallel_size ranks")
    return replace(config, device=_rank_device(config.device, member.local_rank))


def _rank_device(configured: str, local_rank: int) -> str:
    if os.environ.get(DEVICE_ENV):
        return os.environ[DEVICE_ENV]
    if configured == "cpu" or configured == "mps":
        return configured
    return f"cuda:{local_rank}"  # "auto" / "cuda:N" on a rank started without PIE_DEVICE: one GPU per local rank


def _build_engine(member: parallel.Membership, config: EngineConfig, server: Connection | None) -> Engine:
    import torch

    from pie.engine.device import resolve_device
    from pie.engine.engine import Engine

    try:
        device = resolve_device(config.device)
        if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
            # The ranks of one host share its cores; torch would give each of them all of them.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // member.local_world_size))
        tp = parallel.compute_group(member, device)
        return Engine(config, tp=tp)
    except PieError as e:  # config / checkpoint problems: every rank raises the same; rank 0 reports it
        print(f"pie engine worker rank {member.rank}: {type(e).__name__}: {e}", file=sys.stderr)
        if server is not None:
            _send(server, ["error", *wire.error_to_wire(e)])
        raise SystemExit(1) from None
    except Exception as e:  # e.g. out of memory on this rank's device
        raise Fatal(f"loading the model failed: {type(e).__name__}: {e}\n{traceback.format_exc()}") from e


def _next_message(member: parallel.Membership, server: Connection | None) -> list[Any]:
    """The next request, on every rank. A server that went away is a close (rank 0 passes that on)."""
    if server is not None:
        try:
            data = server.recv_bytes()
            message = wire.decode(data)  # a malformed message stops here, before the other ranks see it
        except (EOFError, OSError):
            data, message = wire.encode(["close"]), ["close"]
        except ProtocolError as e:
            raise Fatal(str(e)) from e
        member.control.broadcast(data)
        return message
    try:
        return wire.decode(member.control.broadcast(None))
    except RuntimeError as e:  # rank 0 is gone (gloo saw the connection close)
        raise Fatal(f"lost rank 0: {e}") from e


def _execute(engine: Engine, message: list[Any]) -> list[Any]:
    op, *args = message
    try:
        if op == "forward":
            return ["ok", engine.forward_batch(*args)]
        if op == "copy_pages":
            engine.copy_pages(*args)
            return ["ok", None]
        if op == "close":
            return ["ok", None]
    except PieError as e:  # raised on every rank before any collective: the group stays in step
        return ["error", *wire.error_to_wire(e)]
    except Exception as e:  # a failed collective, OOM, a bug: the ranks may be out of step
        raise Fatal(f"{op} failed: {type(e).__name__}: {e}\n{traceback.format_exc()}") from e
    raise Fatal(f"unknown op {op!r}")


def _send(server: Connection, message: list[Any]) -> None:
    try:
        server.send_bytes(wire.encode(message))
    except OSError as e:  # the server is gone; rank 0 finds out on its next read and closes the group
        print(f"pie engine worker: cannot reply to the server ({e})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
