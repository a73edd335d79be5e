"""Tensor-parallel process groups: which rank this process is, and the collectives the model needs.

    member = join_from_env()                     # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (torchrun-style)
    data = member.control.broadcast(data)        # rank 0's bytes on every rank (the worker's step messages)
    tp = compute_group(member, device)           # NCCL on CUDA, gloo on CPU
    engine = Engine(config, tp=tp)               # sharded layers all-reduce / all-gather over tp

`TPGroup` is handed to the model at build time. At size 1 (`SINGLE`) the
model is built from the plain layers and no collective is ever called, so the
single-device path is exactly the unsharded one.

Two process groups: the compute group (NCCL on CUDA, gloo on CPU) carries
the activations; the default group (always gloo, on the host) is the control
channel for the worker's step messages. The control group has a long timeout because the non-zero ranks
wait in it for as long as the server sends no batch; a dead peer still ends
that wait at once (gloo sees the closed connection).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from pie.errors import ConfigError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Idle servers send nothing for hours; the waiting ranks must not time out in the meantime.
CONTROL_TIMEOUT = timedelta(days=365)
# A collective of the forward pass that waits this long means a peer is wedged (not dead: that fails at once).
COMPUTE_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True, eq=False)
class TPGroup:
    """One tensor-parallel group as seen from one rank. `group` is None at size 1 (no collectives)."""

    rank: int
    size: int
    group: ProcessGroup | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place (row-parallel outputs, vocab-parallel embeddings)."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on every rank -> [..., size * n], rank 0's columns first (vocab-parallel logits)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def min_int(self, value: int, device: torch.device) -> int:
        """The smallest `value` over the ranks (every rank must size its KV pool the same)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def split(self, total: int, what: str) -> int:
        """`total` / size, or a ConfigError naming `what` when it does not divide."""
        if total % self.size:
            raise ConfigError(f"tensor_parallel_size = {self.size} does not divide {what} = {total}; "
                              f"use a tensor_parallel_size that divides {total}")
        return total // self.size


SINGLE = TPGroup(rank=0, size=1)


class ControlChannel:
    """Rank 0's bytes to every rank, over the host-side gloo group (a length, then the payload)."""

    def __init__(self, rank: int, group: ProcessGroup) -> None:
        self.rank, self.group = rank, group

    def broadcast(self, data: bytes | None) -> bytes:
        """Rank 0 passes `data`; every rank (rank 0 included) gets it back."""
        length = torch.tensor([len(data) if self.rank == 0 and data is not None else 0], dtype=torch.int64)
        dist.broadcast(length, src=0, group=self.group)
        if self.rank == 0:
            assert data is not None, "rank 0 broadcasts; it must pass the bytes"
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        else:
            buf = torch.empty(int(length.item()), dtype=torch.uint8)
        if buf.numel():
            dist.broadcast(buf, src=0, group=self.group)
        return data if self.rank == 0 and data is not None else buf.numpy().tobytes()


@dataclass(frozen=True, eq=False)
class Membership:
    """This process's place in the worker group, and the control channel every rank listens on."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    control: ControlChannel


def env_rank() -> tuple[int, int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) from the torchrun-style environment."""
    missing = [k for k in ENV_KEYS if not os.environ.get(k)]
    if missing:
        raise ConfigError(f"the engine worker needs the torchrun-style environment {', '.join(ENV_KEYS)}; "
                          f"missing: {', '.join(missing)} (see docs/parallelism.md for the commands)")
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    except ValueError as e:
        raise ConfigError(f"RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers: {e}") from None
    if not 0 <= rank < world:
        raise ConfigError(f"RANK = {rank} is outside WORLD_SIZE = {world}; ranks are 0 .. WORLD_SIZE - 1")
    return rank, world, local_rank, local_world


def join_from_env(store_fd: int | None = None) -> Membership:
    """Rendezvous at MASTER_ADDR:MASTER_PORT (rank 0 hosts the store); the default group is the gloo control group.

    `store_fd` (rank 0 only): a socket already listening at MASTER_PORT, bound by the process that chose
    the port, so that nothing can take the port before the store serves on it; without it rank 0 binds
    MASTER_PORT itself. The device (and so the compute backend) is not known yet: remote ranks learn the
    config from rank 0 over this group first, then `compute_group` builds the group the model's
    collectives run on.
    """
    rank, world, local_rank, local_world = env_rank()
    try:
        port = int(os.environ["MASTER_PORT"])
    except ValueError:
        raise ConfigError(f"MASTER_PORT must be a port number, got {os.environ['MASTER_PORT']!r}") from None
    if store_fd is not None and rank != 0:
        raise ConfigError(f"RANK = {rank} was given a store socket; only rank 0 serves the rendezvous store")
    # Every rank builds the same kind of store (rank 0 the server, the others clients), so the keys
    # of init_process_group line up on all of them.
    store = dist.TCPStore(os.environ["MASTER_ADDR"], port, world, is_master=rank == 0, timeout=CONTROL_TIMEOUT,
                          wait_for_workers=False, master_listen_fd=store_fd)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=CONTROL_TIMEOUT)
    world_group = dist.group.WORLD
    assert world_group is not None, "init_process_group sets the default group"
    return Membership(rank, world, local_rank, local_world, ControlChannel(rank, world_group))


def compute_group(member: Membership, device: torch.device) -> TPGroup:
    """The group of every rank for the forward pass: NCCL on CUDA (bound to `device`), gloo on the host."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        group = dist.new_group(backend="nccl", timeout=COMPUTE_TIMEOUT)
    else:
        group = dist.new_group(backend="gloo", timeout=COMPUTE_TIMEOUT)
    return TPGroup(rank=member.rank, size=member.world_size, group=group)


def barrier(member: Membership) -> None:
    """Wait for every rank on the control group; a RuntimeError when a peer has died."""
    dist.barrier(group=member.control.group)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
