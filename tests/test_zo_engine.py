"""Zeroth-order training in the engine: a pass with `Request.zo_seed` runs its adapter as theta + sigma *
eps(seed), batched beside other seeds and unperturbed passes, and `zo_update` moves theta by the ES step.

The reference for a perturbed pass is a second adapter whose PEFT files hold theta + sigma * eps(seed)
explicitly, loaded the ordinary way; eps comes from `pie.engine.zo.perturbation`, the engine's own draw.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import VOCAB
from engine_helpers import SeqPager, all_row_logits, logits_of, make_engine, random_prompts, rel_err
from lora_helpers import make_adapter

from pie.engine.adapters import CONFIG_FILE, WEIGHTS_FILE, read_peft_dir
from pie.engine.batch import ForwardBatch, OutputSpec, Probe
from pie.engine.engine import Engine
from pie.engine.zo import perturbation, recombination_weights
from pie.errors import AdapterError, BatchError

SIGMA = 0.05
TOL = 1e-5


@pytest.fixture(scope="module")
def peft_folder(checkpoint_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    """A PEFT adapter for the tiny llama, made once for the module (PEFT itself is the slow part)."""
    folder = tmp_path_factory.mktemp("zo") / "a"
    make_adapter(checkpoint_dir("llama"), folder, seed=1, r=4, lora_alpha=8,
                 target_modules=["q_proj", "v_proj", "down_proj"])
    return folder


@pytest.fixture
def engine_and_slot(checkpoint_dir, peft_folder: Path) -> tuple[Engine, int, Path]:  # type: ignore[no-untyped-def]
    engine = make_engine(checkpoint_dir("llama"), kv_page_size=4, max_num_adapters=6)
    slot = engine.load_adapter(peft_folder)
    engine.zo_initialize(slot, 4, 8.0, population_size=4, mu_fraction=0.5, initial_sigma=SIGMA)
    return engine, slot, peft_folder


def logits(engine: Engine, prompts: list[list[int]], adapters: list[int | None],
           zo_seeds: list[int | None]) -> list[np.ndarray]:
    """One prefill batch; every row's logits per request."""
    pager = SeqPager(engine)
    reqs = [pager.request(i, p, [OutputSpec(j, probe=Probe("logits")) for j in range(len(p))], adapter=a,
                          zo_seed=z)
            for i, (p, a, z) in enumerate(zip(prompts, adapters, zo_seeds, strict=True))]
    out = engine.forward_batch(ForwardBatch(reqs)).outputs
    return [np.stack([logits_of(v) for v in row]) for row in out]  # type: ignore[arg-type]


def write_explicit(src: Path, dst: Path, seed: int, sigma: float, device: torch.device) -> None:
    """A PEFT folder holding the adapter in `src` perturbed by sigma * eps(seed), written out by hand."""
    from safetensors.torch import save_file

    _, tensors = read_peft_dir(src)
    eps = perturbation({k: t.shape for k, t in tensors.items()}, seed, device)
    dst.mkdir(parents=True)
    (dst / CONFIG_FILE).write_text((src / CONFIG_FILE).read_text())
    save_file({k: (t.float() + sigma * eps[k].cpu()).contiguous() for k, t in tensors.items()},
              str(dst / WEIGHTS_FILE))


def test_a_zo_pass_equals_the_adapter_perturbed_by_hand(engine_and_slot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    engine, slot, folder = engine_and_slot
    write_explicit(folder, tmp_path / "explicit", 1234, SIGMA, engine.device)
    explicit = engine.load_adapter(tmp_path / "explicit")
    prompts = random_prompts(1, VOCAB, 9, 9, seed=2)
    zo = logits(engine, prompts, [slot], [1234])[0]
    by_hand = logits(engine, prompts, [explicit], [None])[0]
    plain = logits(engine, prompts, [slot], [None])[0]
    assert rel_err(zo, by_hand) < TOL
    assert rel_err(zo, plain) > 1e-3  # the perturbation really changed the output


def test_seeds_batched_together_equal_each_alone_and_repeat_exactly(engine_and_slot) -> None:  # type: ignore[no-untyped-def]
    engine, slot, _ = engine_and_slot
    prompts = random_prompts(4, VOCAB, 4, 12, seed=3)
    adapters, seeds = [slot, slot, None, slot], [7, 8, None, None]
    mixed = logits(engine, prompts, adapters, seeds)
    for i in range(4):
        alone = logits(engine, [prompts[i]], [adapters[i]], [seeds[i]])[0]
        assert rel_err(mixed[i], alone) < TOL
    assert rel_err(mixed[0], logits(engine, [prompts[0]], [slot], [8])[0]) > 1e-3  # seeds differ
    again = logits(engine, prompts, adapters, seeds)
    for a, b in zip(mixed, again, strict=True):
        np.testing.assert_array_equal(a, b)  # the same seeds, the same batch: identical
    # Equal seeds mod 2**64 are one seed.
    np.testing.assert_array_equal(logits(engine, [prompts[0]], [slot], [7 + 2**64])[0],
                                  logits(engine, [prompts[0]], [slot], [7])[0])


def test_update_moves_theta_by_sigma_times_the_weighted_winners(engine_and_slot) -> None:  # type: ignore[no-untyped-def]
    engine, slot, _ = engine_and_slot
    before = engine.adapters.theta(slot)
    seeds, scores = [11, 12, 13, 14], [0.5, 2.0, -1.0, 1.0]  # best: 12, then 14 (mu = 2 of 4)
    engine.zo_update(slot, scores, seeds, max_sigma=1.0)
    after = engine.adapters.theta(slot)
    w = recombination_weights(2)
    assert w[0] > w[1] > 0 and math.isclose(sum(w), 1.0)
    shapes = {k: t.shape for k, t in before.items()}
    e12, e14 = perturbation(shapes, 12, engine.device), perturbation(shapes, 14, engine.device)
    for k in before:
        expected = before[k] + SIGMA * (w[0] * e12[k] + w[1] * e14[k])
        torch.testing.assert_close(after[k], expected, rtol=1e-5, atol=1e-6)
    state = engine.adapters.zo_state(slot)
    assert state is not None and state.generation == 1 and 0 < state.sigma <= 1.0
    # The pass uses the new theta: an unperturbed pass now equals the old theta perturbed by the ES step.
    prompts = random_prompts(1, VOCAB, 6, 6, seed=4)
    assert rel_err(logits(engine, prompts, [slot], [None])[0], logits(engine, prompts, [slot], [None])[0]) == 0
    # max_sigma caps the step size for the next generation.
    engine.zo_update(slot, scores, seeds, max_sigma=0.01)
    assert engine.adapters.zo_state(slot).sigma == 0.01  # type: ignore[union-attr]


def test_update_changes_what_a_pass_computes_and_the_saved_adapter(engine_and_slot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    engine, slot, _ = engine_and_slot
    prompts = random_prompts(1, VOCAB, 6, 6, seed=5)
    before = logits(engine, prompts, [slot], [None])[0]
    perturbed_before = logits(engine, prompts, [slot], [21])[0]  # cached in a scratch slot
    engine.zo_update(slot, [1.0, 0.0], [21, 22], max_sigma=1.0)
    after = logits(engine, prompts, [slot], [None])[0]
    assert rel_err(after, before) > 1e-4
    assert rel_err(logits(engine, prompts, [slot], [21])[0], perturbed_before) > 1e-4  # not a stale copy
    engine.save_adapter(slot, tmp_path / "saved")
    reloaded = engine.load_adapter(tmp_path / "saved")
    assert rel_err(logits(engine, prompts, [reloaded], [None])[0], after) < TOL


def test_a_fork_carries_the_zo_state_and_evolves_on_its_own(engine_and_slot) -> None:  # type: ignore[no-untyped-def]
    engine, slot, _ = engine_and_slot
    fork = engine.fork_adapter(slot)
    prompts = random_prompts(1, VOCAB, 6, 6, seed=11)
    np.testing.assert_array_equal(logits(engine, prompts, [fork], [9])[0], logits(engine, prompts, [slot], [9])[0])
    original = logits(engine, prompts, [slot], [None])[0]
    engine.zo_update(fork, [0.0, 1.0], [9, 10], max_sigma=1.0)
    np.testing.assert_array_equal(logits(engine, prompts, [slot], [None])[0], original)  # untouched
    assert rel_err(logits(engine, prompts, [fork], [None])[0], original) > 1e-4
    assert engine.adapters.zo_state(fork).generation == 1 and engine.adapters.zo_state(slot).generation == 0  # type: ignore[union-attr]


def test_a_fresh_zo_adapter_starts_as_the_base_model_and_perturbs_every_projection(checkpoint_dir) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(checkpoint_dir("llama"), kv_page_size=4, max_num_adapters=3)
    slot = engine.zo_initialize(None, 2, 4.0, population_size=4, mu_fraction=0.25, initial_sigma=0.1)
    info = engine.adapter_info(slot)
    assert info.rank == 2 and len(info.targets) == 8  # qkv, o, gate_up, down in both layers
    assert engine.adapters.zo_state(slot).mu == 1  # type: ignore[union-attr]
    prompts = random_prompts(1, VOCAB, 6, 6, seed=6)
    base = all_row_logits(engine, prompts)[0]
    assert rel_err(logits(engine, prompts, [slot], [None])[0], base) < 1e-6  # lora_B = 0
    assert rel_err(logits(engine, prompts, [slot], [3])[0], base) > 1e-3


def test_more_seeds_than_scratch_slots_is_a_batch_error_that_names_the_cap(engine_and_slot) -> None:  # type: ignore[no-untyped-def]
    engine, slot, _ = engine_and_slot  # 6 slots, 1 resident: 5 scratch slots
    prompts = random_prompts(6, VOCAB, 3, 3, seed=7)
    with pytest.raises(BatchError, match=r"6 distinct \(adapter, zo_seed\) perturbations, over the 5 scratch "
                                         r"adapter slots \(max_num_adapters = 6 minus 1 resident"):
        logits(engine, prompts, [slot] * 6, list(range(6)))
    out = logits(engine, prompts[:5] + prompts[:1], [slot] * 6, [0, 1, 2, 3, 4, 2**64])  # 2**64 = seed 0: one
    assert rel_err(out[0], out[5]) < TOL


def test_bad_zo_requests_and_settings_are_refused(engine_and_slot, checkpoint_dir, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    engine, slot, folder = engine_and_slot
    prompts = random_prompts(1, VOCAB, 3, 3, seed=8)
    with pytest.raises(BatchError, match=r"request 0: zo_seed 5 needs an integer seed and an adapter"):
        logits(engine, prompts, [None], [5])
    plain = engine.load_adapter(folder)
    with pytest.raises(BatchError, match=r"request 0 has a zo_seed for adapter slot .* no zo state.*zo.initialize"):
        logits(engine, prompts, [plain], [5])
    with pytest.raises(AdapterError, match=r"rank 4 and alpha 8.*pass its own rank and alpha"):
        engine.zo_initialize(plain, 2, 8.0, 4, 0.5, 0.1)
    with pytest.raises(AdapterError, match=r"mu_fraction must be in \(0, 1\]"):
        engine.zo_initialize(plain, 4, 8.0, 4, 0.0, 0.1)
    with pytest.raises(AdapterError, match=r"initial_sigma must be a finite number > 0"):
        engine.zo_initialize(plain, 4, 8.0, 4, 0.5, -1.0)
    with pytest.raises(AdapterError, match=r"zo rank must be an integer in \[1, max_adapter_rank = 8\]"):
        engine.zo_initialize(None, 9, 8.0, 4, 0.5, 0.1)
    with pytest.raises(AdapterError, match=r"has no zo state"):
        engine.zo_update(plain, [1.0], [1], 1.0)
    before = engine.adapters.theta(slot)
    with pytest.raises(AdapterError, match=r"1 scored seeds, fewer than the mu = 2"):
        engine.zo_update(slot, [1.0], [1], 1.0)
    with pytest.raises(AdapterError, match=r"2 scores for 3 seeds"):
        engine.zo_update(slot, [1.0, 2.0], [1, 2, 3], 1.0)
    with pytest.raises(AdapterError, match=r"must be finite"):
        engine.zo_update(slot, [1.0, float("nan")], [1, 2], 1.0)
    for k, t in engine.adapters.theta(slot).items():  # refused updates changed nothing
        torch.testing.assert_close(t, before[k], rtol=0, atol=0)
    assert len(logits(engine, prompts, [slot], [5])[0]) == 3  # and the engine serves on


@pytest.mark.gpu
def test_zo_passes_on_cuda_draw_on_the_device_and_match_the_explicit_adapter(checkpoint_dir, peft_folder: Path,  # type: ignore[no-untyped-def]
                                                                             tmp_path: Path) -> None:
    engine = make_engine(checkpoint_dir("llama"), device="cuda:0", activation_dtype="bfloat16", kv_page_size=16,
                         max_num_adapters=6)
    slot = engine.load_adapter(peft_folder)
    engine.zo_initialize(slot, 4, 8.0, population_size=4, mu_fraction=0.5, initial_sigma=SIGMA)
    write_explicit(peft_folder, tmp_path / "explicit", 99, SIGMA, engine.device)  # eps from the CUDA generator
    explicit = engine.load_adapter(tmp_path / "explicit")
    prompts = random_prompts(3, VOCAB, 5, 12, seed=9)
    mixed = logits(engine, prompts, [slot, slot, None], [99, 5, None])
    assert rel_err(mixed[0], logits(engine, [prompts[0]], [explicit], [None])[0]) < 2e-2  # bf16
    np.testing.assert_array_equal(mixed[0], logits(engine, prompts, [slot, slot, None], [99, 5, None])[0])
    assert rel_err(mixed[1], logits(engine, [prompts[1]], [slot], [5])[0]) < 2e-2
    before = logits(engine, [prompts[0]], [slot], [None])[0]
    engine.zo_update(slot, [1.0, 0.0], [99, 5], max_sigma=1.0)  # the update redraws eps on the device too
    assert rel_err(logits(engine, [prompts[0]], [slot], [None])[0], before) > 1e-3  # theta moved


def test_a_zo_step_materialising_new_seeds_reads_nothing_back(engine_and_slot) -> None:  # type: ignore[no-untyped-def]
    """Drawing and materialising the perturbations happens on the device: the step keeps its one copy each
    way and no other read-back (what a CUDA step would sync on)."""
    from test_engine_step import _READBACKS, counting_readbacks

    from pie.engine import transfer

    engine, slot, _ = engine_and_slot
    prompts = random_prompts(4, VOCAB, 3, 6, seed=12)
    pager = SeqPager(engine)
    for i, p in enumerate(prompts):
        engine.forward_batch(ForwardBatch([pager.request(i, p[:-1], [])]))
    batch = ForwardBatch([pager.request(i, p[-1:], [OutputSpec(0, probe=Probe("logits"))], adapter=slot,
                                        zo_seed=100 + i if i < 3 else None) for i, p in enumerate(prompts)])
    ups, downs = transfer.COUNTS.host_to_device, transfer.COUNTS.device_to_host
    with counting_readbacks() as calls:
        engine.forward_batch(batch)  # seeds 100..102 are new: three perturbed copies drawn in this step
    assert transfer.COUNTS.device_to_host - downs == 1 and transfer.COUNTS.host_to_device - ups == 1
    assert calls == dict.fromkeys(_READBACKS, 0)
