"""The recurrent-state pool: sizing from a budget, copy / reset / swap of whole slots, integrity, bad slot ids."""

from __future__ import annotations

import pytest
import torch

from pie.engine.state_pool import StatePool, StateShape, StateSwapPool
from pie.errors import BatchError, ConfigError

CPU = torch.device("cpu")
SHAPE = StateShape(num_layers=3, conv_dim=10, conv_kernel=4, num_heads=2, dim_a=4, dim_b=5,
                   conv_dtype=torch.bfloat16)


def _filled(num_slots: int = 6) -> StatePool:
    pool = StatePool(SHAPE, num_slots, CPU)
    gen = torch.Generator().manual_seed(0)
    pool.conv.copy_(torch.randn(pool.conv.shape, generator=gen))
    pool.state.copy_(torch.randn(pool.state.shape, generator=gen))
    return pool


def test_bytes_per_slot_and_budget() -> None:
    # per layer: conv 10 * 3 bf16 = 60 B, state 2 * 4 * 5 float32 = 160 B
    assert SHAPE.bytes_per_slot == 3 * (60 + 160)
    pool = StatePool.from_budget(SHAPE, 10 * SHAPE.bytes_per_slot + 7, CPU)
    assert pool.num_slots == 10
    assert pool.nbytes == 10 * SHAPE.bytes_per_slot
    assert StatePool.from_budget(SHAPE, 10 * SHAPE.bytes_per_slot, CPU, max_slots=4).num_slots == 4
    with pytest.raises(ConfigError, match=f"at least {SHAPE.bytes_per_slot} bytes"):
        SHAPE.slots_for_budget(SHAPE.bytes_per_slot - 1)


def test_copy_forks_every_layer_and_leaves_the_source() -> None:
    pool = _filled()
    before = pool.conv.clone(), pool.state.clone()
    pool.copy([1, 2], [4, 5])
    assert torch.equal(pool.conv[4], before[0][1]) and torch.equal(pool.state[5], before[1][2])
    assert torch.equal(pool.conv[:4], before[0][:4]) and torch.equal(pool.state[:4], before[1][:4])
    pool.state[4] += 1  # the copy is independent
    assert torch.equal(pool.state[1], before[1][1])
    pool.copy([0, 1], [1, 0])  # a swap: sources are read before any destination is written
    assert torch.equal(pool.conv[0], before[0][1]) and torch.equal(pool.conv[1], before[0][0])
    pool.check_integrity()


def test_reset_zeroes_only_the_named_slots() -> None:
    pool = _filled()
    keep = pool.state[3].clone()
    pool.reset([1, 2])
    assert not pool.conv[1:3].any() and not pool.state[1:3].any()
    assert torch.equal(pool.state[3], keep)


def test_read_write_one_layer() -> None:
    pool = _filled()
    slots = torch.tensor([3, 0])
    conv, state = pool.read(1, slots)
    pool.write(1, slots, conv * 0 + 2, state * 0 + 3)
    assert bool((pool.conv[[3, 0], 1] == 2).all()) and bool((pool.state[[3, 0], 1] == 3).all())
    assert not bool((pool.state[3, 0] == 3).all())  # other layers untouched


def test_swap_out_and_in_is_bit_identical() -> None:
    pool = _filled()
    host = StateSwapPool(SHAPE, 3, CPU)
    saved = pool.conv[2].clone(), pool.state[2].clone(), pool.state[5].clone()
    host.swap_out(pool, [(2, 0), (5, 2)])
    pool.reset([2, 5])
    host.swap_in(pool, [(2, 1), (0, 4)])  # back into other device slots
    assert torch.equal(pool.conv[4], saved[0]) and torch.equal(pool.state[4], saved[1])
    assert torch.equal(pool.state[1], saved[2])


def test_bad_slot_ids_are_batch_errors() -> None:
    pool = _filled(4)
    with pytest.raises(BatchError, match=r"slot 4 is out of range: the pool has slots 0\.\.3"):
        pool.copy([0], [4])
    with pytest.raises(BatchError, match="2 sources and 1 destinations"):
        pool.copy([0, 1], [2])
    with pytest.raises(BatchError, match="host state slot 1 is out of range"):
        StateSwapPool(SHAPE, 1, CPU).swap_out(pool, [(0, 1)])


def test_integrity_catches_non_finite_state() -> None:
    pool = _filled()
    pool.check_integrity()
    pool.state[2, 1, 0, 0, 0] = float("nan")
    with pytest.raises(AssertionError, match="non-finite"):
        pool.check_integrity()


def test_recurrent_batch_groups_resets_fresh_slots_and_refuses_shared_slots() -> None:
    from pie.engine.state_pool import RecurrentBatch

    pool = _filled()
    keep = pool.state[2].clone()
    # requests: 1 token (slot 2), 3 tokens fresh (slot 4), 1 token fresh (slot 0)
    batch = RecurrentBatch(pool, [0, 1, 4, 5], [2, 4, 0], [False, True, True])
    assert not pool.state[4].any() and not pool.conv[0].any()  # fresh slots zeroed first
    assert torch.equal(pool.state[2], keep)
    decode, prefill = batch.groups
    assert decode.decode and decode.rows.tolist() == [0, 4] and decode.slots.tolist() == [2, 0]
    assert not prefill.decode and prefill.rows.tolist() == [1, 2, 3] and prefill.q_len == 3
    with pytest.raises(BatchError, match="same state slot"):
        RecurrentBatch(pool, [0, 1, 2], [3, 3], [False, False])
