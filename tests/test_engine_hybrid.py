"""Hybrid models through `Engine.forward_batch` with state slots, against transformers (tiny, float32).

Requests name their recurrent-state slot (`Request.state_slot`); batches copy and swap slots
(`ForwardBatch.state_copies` / `state_swap_out` / `state_swap_in`). Prefill logits (page sizes 1 and 16),
32 greedy steps of two sequences of different lengths decoded together (tokens and every step's logits),
chunked prefill resuming from the slot inside a mixed prefill/decode batch, fork by slot copy, a swap
round trip, the pool's sizing and the checks of slots.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from checkpoints import config_for, load_reference, tiny_checkpoint
from engine_helpers import SeqPager, logits_of, make_engine

from pie.engine.batch import ForwardBatch, OutputSpec, Probe, Request, Sampler
from pie.engine.engine import Engine
from pie.engine.models.registry import get_architecture, unsupported_reason
from pie.engine.parallel import TPGroup
from pie.errors import BatchError, ConfigError

PROMPTS = [[5, 9, 100, 3, 77, 41, 8, 250, 13, 6, 99, 120, 7], [11, 300, 4], list(range(20, 90))]
TOL = 1e-4  # max |ours - ref| / max |ref|
HYBRIDS = ["qwen3_5_text", "qwen3_5", "qwen3_next", "qwen3_5_moe_text", "qwen3_5_moe", "nemotron_h"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    """Built on first use per family (transformers' own classes), shared by the module."""
    made: dict[str, tuple[Path, Any]] = {}

    class Lazy(dict):  # type: ignore[type-arg]
        def __missing__(self, arch: str) -> tuple[Path, Any]:
            directory = tiny_checkpoint(tmp_path_factory.mktemp(arch), arch, seed=3)
            made[arch] = (directory, load_reference(directory))
            return made[arch]

    return Lazy()


def _engine(directory: Path, page_size: int = 16, **kw: Any) -> Engine:
    return make_engine(directory, activation_dtype="float32", kv_page_size=page_size, max_num_kv_pages=256,
                       max_num_state_slots=8, **kw)


def _close(ours: np.ndarray | torch.Tensor, ref: torch.Tensor) -> None:
    ours_t = torch.tensor(np.array(ours), dtype=torch.float32)
    err = ((ours_t - ref.float()).abs().max() / ref.float().abs().max()).item()
    assert err < TOL, f"relative error {err:.3g} >= {TOL}"


def _hf_logits(model: Any, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def _rows(n: int) -> list[OutputSpec]:
    return [OutputSpec(j, probe=Probe("logits")) for j in range(n)]


def _greedy_and_logits(row: int) -> list[OutputSpec]:
    return [OutputSpec(row, Sampler("argmax")), OutputSpec(row, probe=Probe("logits"))]


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("arch", HYBRIDS)
def test_prefill_logits_match_transformers(checkpoints: dict[str, tuple[Path, Any]], arch: str,
                                           page_size: int) -> None:
    directory, ref = checkpoints[arch]
    engine = _engine(directory, page_size)
    assert engine.info.num_state_slots == 8 and engine.info.state_bytes_per_slot > 0
    pager = SeqPager(engine)
    reqs = [pager.request(i, p, _rows(len(p)), state_slot=7 - i) for i, p in enumerate(PROMPTS)]
    res = engine.forward_batch(ForwardBatch(reqs))
    for prompt, out in zip(PROMPTS, res.outputs, strict=True):
        _close(np.stack([logits_of(v) for v in out]), _hf_logits(ref, prompt))  # type: ignore[arg-type]
    assert engine.states is not None
    engine.states.check_integrity()


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("arch", HYBRIDS)
def test_greedy_32_steps_two_sequences_match_transformers(checkpoints: dict[str, tuple[Path, Any]], arch: str,
                                                          page_size: int) -> None:
    """Two sequences of different lengths decoded together: identical tokens and every step's logits."""
    directory, ref = checkpoints[arch]
    engine = _engine(directory, page_size)
    pager = SeqPager(engine)
    prompts = PROMPTS[:2]
    tokens: list[list[int]] = [[], []]
    logits: list[list[np.ndarray]] = [[], []]
    feeds = [list(p) for p in prompts]
    for _ in range(32):
        reqs = [pager.request(i, f, _greedy_and_logits(len(f) - 1), state_slot=3 + i) for i, f in enumerate(feeds)]
        res = engine.forward_batch(ForwardBatch(reqs))
        for i, (tok, row) in enumerate(res.outputs):
            tokens[i].append(int(tok))  # type: ignore[arg-type]
            logits[i].append(logits_of(row))  # type: ignore[arg-type]
        feeds = [[t[-1]] for t in tokens]
    for i, prompt in enumerate(prompts):
        ref_logits = _hf_logits(ref, [*prompt, *tokens[i]])[len(prompt) - 1:-1]
        assert tokens[i] == ref_logits.argmax(-1).tolist()
        for ours, theirs in zip(logits[i], ref_logits, strict=True):
            _close(ours, theirs)


def test_chunked_prefill_resumes_from_the_slot_in_mixed_batches(checkpoints: dict[str, tuple[Path, Any]]) -> None:
    """A 70-token prompt in chunks of 30, 1 and 39 beside a sequence that decodes and one that starts."""
    directory, ref = checkpoints["qwen3_5_text"]
    engine = _engine(directory)
    pager = SeqPager(engine)
    long, short, late = PROMPTS[2], PROMPTS[0], PROMPTS[1]
    first = engine.forward_batch(ForwardBatch([pager.request(0, long[:30], _rows(30), state_slot=0),
                                               pager.request(1, short[:-1], _rows(1), state_slot=1)]))
    second = engine.forward_batch(ForwardBatch([pager.request(0, long[30:31], _rows(1), state_slot=0),
                                                pager.request(1, short[-1:], _rows(1), state_slot=1),
                                                pager.request(2, late, _rows(len(late)), state_slot=2)]))
    third = engine.forward_batch(ForwardBatch([pager.request(0, long[31:], _rows(39), state_slot=0)]))
    ours = np.stack([logits_of(v) for out in (first.outputs[0], second.outputs[0], third.outputs[0])  # type: ignore[arg-type]
                     for v in out])
    _close(ours, _hf_logits(ref, long))
    _close(logits_of(second.outputs[1][0]), _hf_logits(ref, short)[-1])  # type: ignore[arg-type]
    _close(np.stack([logits_of(v) for v in second.outputs[2]]), _hf_logits(ref, late))  # type: ignore[arg-type]


def test_fork_by_state_copy_then_continue_equals_recompute(checkpoints: dict[str, tuple[Path, Any]]) -> None:
    """The child's slot is a copy of the parent's (state_copies) and its pages copies of the parent's pages."""
    directory, ref = checkpoints["qwen3_5_text"]
    engine = _engine(directory, page_size=4)
    pager = SeqPager(engine)
    prompt = PROMPTS[0]
    engine.forward_batch(ForwardBatch([pager.request(0, prompt, [], state_slot=5)]))
    child_pages = list(range(pager.next_page, pager.next_page + len(pager.pages[0])))
    pager.next_page += len(child_pages)
    pager.pages[1], pager.kv_len[1] = list(child_pages), pager.kv_len[0]
    copies = list(zip(pager.pages[0], child_pages, strict=True))
    # Both branches continue in the very batch that forks: copies run before the forward.
    res = engine.forward_batch(ForwardBatch([pager.request(0, [42, 43], _rows(2), state_slot=5),
                                             pager.request(1, [7, 8, 9], _rows(3), state_slot=2)],
                                            page_copies=copies, state_copies=[(5, 2)]))
    _close(np.stack([logits_of(v) for v in res.outputs[0]]), _hf_logits(ref, [*prompt, 42, 43])[-2:])  # type: ignore[arg-type]
    _close(np.stack([logits_of(v) for v in res.outputs[1]]), _hf_logits(ref, [*prompt, 7, 8, 9])[-3:])  # type: ignore[arg-type]


def test_state_swap_round_trip_is_bit_identical(checkpoints: dict[str, tuple[Path, Any]]) -> None:
    """Swapped out to the host and back into another slot: the next step's logits are bit-identical."""
    directory, _ = checkpoints["qwen3_5_text"]
    engine = _engine(directory, state_swap_pool_size=2)
    assert engine.info.num_state_swap_slots == 2
    pager = SeqPager(engine)
    engine.forward_batch(ForwardBatch([pager.request(0, PROMPTS[0], [], state_slot=1)]))
    engine.forward_batch(ForwardBatch([], state_swap_out=[(1, 0)]))  # state operations alone are a batch
    a = engine.forward_batch(ForwardBatch([pager.request(0, [17], _rows(1), state_slot=1)])).outputs[0][0]
    pager.kv_len[0] -= 1  # the same step again, from the swapped-in copy (swaps run before the forward)
    b = engine.forward_batch(ForwardBatch([pager.request(0, [17], _rows(1), state_slot=4)],
                                          state_swap_in=[(0, 4)])).outputs[0][0]
    assert a == b


def test_slots_are_checked(checkpoints: dict[str, tuple[Path, Any]]) -> None:
    directory, _ = checkpoints["qwen3_5_text"]
    engine = _engine(directory)
    pager = SeqPager(engine)

    def req(seq: int, masked: bool = False, **kw: Any) -> Request:
        r = pager.request(seq, [1, 2], [], **kw)
        if masked:
            kv_len = pager.kv_len[seq]
            r.attention_mask = [[0, kv_len], [0, kv_len]]
        return r

    cases = [
        ([req(0)], "request 0: this hybrid model keeps a recurrent state per sequence"),
        ([req(0, state_slot=8)], r"request 0: state slot 8 is out of range: the pool has slots 0..7"),
        ([req(0, state_slot=3), req(1, state_slot=3)], "request 1: state slot 3 is also named by request 0"),
        ([req(0, masked=True, state_slot=1)], "request 0: a custom attention mask cannot"),
        ([req(0, state_slot=1, adapter=0)], "request 0: LoRA adapters are not supported on hybrid models"),
    ]
    for reqs, match in cases:
        for validated in (False, True):
            with pytest.raises(BatchError, match=match):
                engine.forward_batch(ForwardBatch(reqs, validated=validated))
    with pytest.raises(BatchError, match="state copy destination state slot 9 is out of range"):
        engine.forward_batch(ForwardBatch([], state_copies=[(0, 9)]))
    with pytest.raises(BatchError, match="host state pool has 0 slots"):
        engine.forward_batch(ForwardBatch([req(2, state_slot=0)], state_swap_out=[(0, 0)]))


def test_a_dense_model_refuses_state_slots(checkpoints: dict[str, tuple[Path, Any]],
                                           tmp_path: Path) -> None:
    engine = make_engine(tiny_checkpoint(tmp_path, "qwen3"), max_num_kv_pages=16)
    assert engine.info.num_state_slots == 0 and engine.info.state_bytes_per_slot == 0
    req = Request(tokens=[1], positions=[0], page_ids=[0], last_page_len=1, state_slot=0)
    with pytest.raises(BatchError, match="request 0: state_slot = 0 given, but this model keeps no recurrent"):
        engine.forward_batch(ForwardBatch([req]))
    with pytest.raises(BatchError, match="no slots"):
        engine.forward_batch(ForwardBatch([], state_copies=[(0, 1)]))


def test_the_state_pool_is_sized_from_the_budget_beside_the_pages(
        checkpoints: dict[str, tuple[Path, Any]]) -> None:
    directory, _ = checkpoints["qwen3_5_text"]
    per_slot = _engine(directory).info.state_bytes_per_slot
    kv_page = _engine(directory).info.kv_bytes_per_page
    budget_gb = (10 * per_slot + 100 * kv_page) / 2**30
    auto = make_engine(directory, activation_dtype="float32", cpu_kv_budget_gb=budget_gb, max_batch_size=64)
    # Automatic: 2 x max_batch_size slots, capped at half the budget; the pages get the rest.
    assert auto.info.num_state_slots == (10 * per_slot + 100 * kv_page) // 2 // per_slot
    assert auto.info.num_pages == (int(budget_gb * 2**30) - auto.info.num_state_slots * per_slot) // kv_page
    with pytest.raises(ConfigError, match=r"recurrent-state pool \(11 slots x .* leaves no room for KV pages"):
        make_engine(directory, activation_dtype="float32", cpu_kv_budget_gb=11 * per_slot / 2**30,
                    max_num_state_slots=11)


@pytest.mark.parametrize("arch", ["qwen3_5_text", "nemotron_h"])
def test_tensor_parallelism_is_refused_naming_the_limit(arch: str) -> None:
    assert unsupported_reason(arch) is None  # served like any family
    cls = get_architecture(arch)
    spec = cls.decoder_spec(config_for(arch))
    with pytest.raises(ConfigError, match=r"tensor_parallel_size = 2 is not supported .*recurrent"):
        cls.check_tensor_parallel(spec, TPGroup(rank=0, size=2))


def test_a_hybrid_config_without_recurrent_layers_runs_on_kv_alone(tmp_path: Path) -> None:
    directory = tiny_checkpoint(tmp_path, "qwen3_5_text", layer_types=["full_attention"] * 4)
    engine = make_engine(directory, activation_dtype="float32")
    assert engine.info.num_state_slots == 0 and engine.states is None
    ref = load_reference(directory)
    out = engine.forward_batch(ForwardBatch([SeqPager(engine).request(0, PROMPTS[1], _rows(3))]))
    _close(np.stack([logits_of(v) for v in out.outputs[0]]), _hf_logits(ref, PROMPTS[1]))  # type: ignore[arg-type]
