"""The engine step: one upload and one download per step, nothing else reads the device, and every pass
value out of its range fails only its own request (issue 12)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from checkpoints import VOCAB
from engine_helpers import SeqPager, all_row_logits, make_engine, random_prompts

from pie.engine import brle, sampling, transfer
from pie.engine.batch import ForwardBatch, OutputSpec, Probe, Request, Sampler
from pie.errors import BatchError

_READBACKS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@pytest.fixture(scope="module")
def engine(checkpoint_dir):  # type: ignore[no-untyped-def]
    return make_engine(checkpoint_dir("qwen3"), max_num_kv_pages=256, max_dist_size=16)


@contextmanager
def counting_readbacks() -> Iterator[dict[str, int]]:
    """Counts every Tensor method that reads a value back to the host (a device sync on CUDA)."""
    calls = dict.fromkeys(_READBACKS, 0)
    originals = {name: getattr(torch.Tensor, name) for name in _READBACKS}

    def counted(name: str):  # type: ignore[no-untyped-def]
        def method(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            calls[name] += 1
            return originals[name](self, *args, **kwargs)
        return method

    for name in _READBACKS:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _decode_batch(engine, outputs_of, n: int = 6, mask: list[int] | None = None) -> ForwardBatch:  # type: ignore[no-untyped-def]
    pager = SeqPager(engine)
    prompts = random_prompts(n, VOCAB, 3, 9, seed=5)
    for i, p in enumerate(prompts):  # prefill, then the decode step under test
        engine.forward_batch(ForwardBatch([pager.request(i, p[:-1], [])]))
    return ForwardBatch([pager.request(i, p[-1:], outputs_of(i), seed=i, logit_mask=mask)
                         for i, p in enumerate(prompts)])


MIXED = [Sampler("argmax"), Sampler("top_k", 0.8, top_k=5), Sampler("top_p", 1.2, top_p=0.7),
         Sampler("min_p", 0.9, min_p=0.2), Sampler("top_k_top_p", 1.0, top_k=20, top_p=0.9),
         Sampler("multinomial", 1.0, draws=4)]
PROBES = [Probe("distribution", k=5), Probe("distribution", temperature=0.0), Probe("logprob", tokens=(3,)),
          Probe("logprobs", tokens=(1, 2, 7)), Probe("entropy"), Probe("logits"), Probe("embedding")]
STEPS = {
    "greedy": lambda i: [OutputSpec(0, Sampler("argmax"))],
    "top_p": lambda i: [OutputSpec(0, Sampler("top_p", 0.7, top_p=0.9))],
    "mixed samplers": lambda i: [OutputSpec(0, MIXED[i % len(MIXED)])],
    "penalties": lambda i: [OutputSpec(0, Sampler("top_k", 0.8, top_k=9, presence_penalty=0.5, frequency_penalty=0.3,
                                                  repetition_penalty=1.3, logit_bias=((4, 2.0),),
                                                  penalty_tokens=(4, 4, 9)))],
    "probes": lambda i: [OutputSpec(0, probe=PROBES[i % len(PROBES)]), OutputSpec(0, MIXED[i % len(MIXED)])],
}


@pytest.mark.parametrize("case", list(STEPS))
def test_a_decode_step_copies_once_each_way_and_reads_nothing_else(engine, case: str) -> None:  # type: ignore[no-untyped-def]
    batch = _decode_batch(engine, STEPS[case], n=7)
    expected = engine.forward_batch(batch).outputs  # warm; also the values the counted step must repeat
    ups, downs = transfer.COUNTS.host_to_device, transfer.COUNTS.device_to_host
    with counting_readbacks() as calls:
        outputs = engine.forward_batch(batch).outputs
    assert transfer.COUNTS.device_to_host - downs == 1
    assert transfer.COUNTS.host_to_device - ups == 1
    assert calls == dict.fromkeys(_READBACKS, 0)
    assert outputs == expected


def test_logit_mask_step_copies_once(engine) -> None:  # type: ignore[no-untyped-def]
    allowed = np.zeros(VOCAB, bool)
    allowed[[7, 70, 300, 511]] = True
    batch = _decode_batch(engine, STEPS["mixed samplers"], mask=brle.encode(allowed))
    downs = transfer.COUNTS.device_to_host
    with counting_readbacks() as calls:
        outputs = engine.forward_batch(batch).outputs
    assert transfer.COUNTS.device_to_host - downs == 1 and sum(calls.values()) == 0
    for out in outputs:
        assert set(np.ravel(out[0])) <= {7, 70, 300, 511}


@pytest.mark.gpu
def test_cuda_step_has_no_hidden_sync(checkpoint_dir) -> None:  # type: ignore[no-untyped-def]
    """On CUDA with FlashInfer (torch_ref's plan uploads its masks from pageable memory, a blocking copy)."""
    pytest.importorskip("flashinfer")
    engine = make_engine(checkpoint_dir("qwen3"), device="cuda", attention_backend="flashinfer")
    for case in STEPS:
        batch = _decode_batch(engine, STEPS[case])
        engine.forward_batch(batch)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any synchronising op other than the event sync raises
        try:
            engine.forward_batch(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_mixed_rows_do_not_depend_on_their_companions(engine) -> None:  # type: ignore[no-untyped-def]
    """A row's tokens are the same alone and beside rows of every other sampler, mask and penalty."""
    alone = {i: engine.forward_batch(ForwardBatch([r])).outputs[0]
             for i, r in enumerate(_decode_batch(engine, STEPS["mixed samplers"]).requests)}
    together = engine.forward_batch(_decode_batch(engine, STEPS["mixed samplers"])).outputs
    assert together == [alone[i] for i in range(len(together))]


def test_penalties_match_their_definitions() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 50, generator=gen) * 4
    rows = torch.tensor([0, 0, 0, 1, 2, 2])
    toks = torch.tensor([5, 5, 9, 5, 0, 49])
    presence, frequency, repetition = torch.tensor([0.5, 0.0, -1.0]), torch.tensor([0.3, 1.0, 0.0]), \
        torch.tensor([1.5, 1.0, 0.5])
    got = sampling.apply_penalties(logits, rows, toks, presence, frequency, repetition).numpy()
    want = logits.numpy().astype(np.float64).copy()
    for r in range(3):
        seen = [t for rr, t in zip(rows.tolist(), toks.tolist(), strict=True) if rr == r]
        for t in set(seen):
            x = want[r, t]
            x = x / float(repetition[r]) if x > 0 else x * float(repetition[r])
            want[r, t] = x - float(presence[r]) - float(frequency[r]) * seen.count(t)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_logit_bias_and_repetition_penalty_steer_greedy(engine) -> None:  # type: ignore[no-untyped-def]
    prompt = random_prompts(1, VOCAB, 6, 6, seed=21)[0]
    logits = all_row_logits(engine, [prompt])[0][-1].astype(np.float64)
    top, worst = int(np.argmax(logits)), int(np.argmin(logits))
    penalized = logits.copy()
    penalized[top] = logits[top] / 50 if logits[top] > 0 else logits[top] * 50
    biased = Sampler("argmax", logit_bias=((worst, 100.0),))
    banned = Sampler("argmax", repetition_penalty=50.0, penalty_tokens=(top, top))
    res = engine.forward_batch(ForwardBatch([SeqPager(engine).request(
        0, prompt, [OutputSpec(5, biased), OutputSpec(5, banned)])])).outputs[0]
    assert res == [worst, int(np.argmax(penalized))]


def test_bitmask_unpacks_every_token() -> None:
    rng = np.random.default_rng(0)
    for vocab in (1, 31, 32, 33, 1000):
        masks = rng.random((3, vocab)) < 0.3
        words = np.stack([np.pad(np.packbits(m, bitorder="little"), (0, -(-vocab // 32) * 4 - -(-vocab // 8)))
                          .view("<i4") for m in masks])
        assert np.array_equal(sampling.unpack_bits(torch.from_numpy(words), vocab).numpy(), masks)


def _good() -> Request:
    return Request(tokens=[5, 6], positions=[0, 1], page_ids=[10], last_page_len=2,
                   outputs=[OutputSpec(1, Sampler("top_p", 0.8, top_p=0.9))], seed=1)


def _bad(**kw: object) -> Request:
    base: dict[str, object] = {"tokens": [5, 6], "positions": [0, 1], "page_ids": [11], "last_page_len": 2,
                               "outputs": [OutputSpec(1, Sampler())]}
    base.update(kw)
    return Request(**base)  # type: ignore[arg-type]


def _out(**kw: object) -> list[OutputSpec]:
    return [OutputSpec(1, Sampler(**kw))]  # type: ignore[arg-type]


OUT_OF_RANGE = {
    "position 2**63": (_bad(positions=[0, 2**63]), "position"),
    "position 2**31": (_bad(positions=[0, 2**31]), "position 2147483648 is outside"),
    "token 2**70": (_bad(tokens=[5, 2**70]), "token id"),
    "page 2**64": (_bad(page_ids=[2**64]), "page id"),
    "top_k over the vocabulary": (_bad(outputs=_out(kind="top_k", top_k=VOCAB + 1)), "top_k = 513 is out of range"),
    "top_k 2**62": (_bad(outputs=_out(kind="top_k", top_k=2**62)), "top_k"),
    "draws 0": (_bad(outputs=_out(kind="multinomial", draws=0)), "draws = 0"),
    "draws 2**40": (_bad(outputs=_out(kind="multinomial", draws=2**40)), "draws = 1099511627776 is out of range"),
    "temperature NaN": (_bad(outputs=_out(kind="top_p", temperature=math.nan)), "temperature = nan"),
    "temperature inf": (_bad(outputs=_out(kind="top_p", temperature=math.inf)), "temperature = inf"),
    "top_p NaN": (_bad(outputs=_out(kind="top_p", top_p=math.nan)), "top_p = nan"),
    "min_p 1.5": (_bad(outputs=_out(kind="min_p", min_p=1.5)), "min_p = 1.5"),
    "presence 3": (_bad(outputs=_out(presence_penalty=3.0)), "presence_penalty = 3.0"),
    "repetition 0": (_bad(outputs=_out(repetition_penalty=0.0)), "repetition_penalty = 0.0"),
    "bias token": (_bad(outputs=_out(logit_bias=((VOCAB, 1.0),))), f"logit_bias token {VOCAB}"),
    "penalty token": (_bad(outputs=_out(penalty_tokens=(-1,))), "penalty token -1"),
    "probe k": (_bad(outputs=[OutputSpec(1, probe=Probe("distribution", k=2**40))]), "max_dist_size = 16"),
    "probe token": (_bad(outputs=[OutputSpec(1, probe=Probe("logprob", tokens=(2**63,)))]), "outside the vocab"),
    "probe temperature": (_bad(outputs=[OutputSpec(1, probe=Probe("distribution", temperature=-1.0))]),
                          "probe temperature"),
    "seed not an int": (_bad(seed="7"), "seed '7' is not an integer"),
}


ARRAY_CASES = ["position 2**63", "position 2**31", "token 2**70", "page 2**64"]


@pytest.mark.parametrize(("case", "validated"), [(c, False) for c in OUT_OF_RANGE] + [(c, True) for c in ARRAY_CASES])
def test_out_of_range_value_fails_only_its_request(engine, case: str, validated: bool) -> None:  # type: ignore[no-untyped-def]
    """The BatchError names request 1 (the runtime retries singly on it), and the good request then runs.

    validated=True: a batch the runtime says it checked still cannot crash the step on the array values
    (positions, tokens, pages); the value checks it skips are the runtime's."""
    bad, message = OUT_OF_RANGE[case]
    with pytest.raises(BatchError, match=f"^request 1: .*{re.escape(message)}"):
        engine.forward_batch(ForwardBatch([_good(), bad], validated=validated))
    assert isinstance(engine.forward_batch(ForwardBatch([_good()], validated=validated)).outputs[0][0], int)


def test_huge_seed_is_reduced_mod_2_64(engine) -> None:  # type: ignore[no-untyped-def]
    def draws(seed: int) -> object:
        req = _good()
        req.outputs, req.seed = [OutputSpec(1, Sampler("multinomial", 1.0, draws=8))], seed
        return engine.forward_batch(ForwardBatch([req])).outputs[0][0]

    assert draws(2**100 + 12345) == draws(12345)
    assert draws(-1) == draws(2**64 - 1)


def test_validate_is_torch_free() -> None:
    code = "import sys, pie.engine.validate; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
def test_fused_add_rmsnorm_matches_the_torch_path() -> None:
    """FlashInfer's fused residual add + RMSNorm (CUDA, bf16) against the add and norm it replaces."""
    pytest.importorskip("flashinfer")
    from pie.engine.layers.norm import RMSNorm

    norm = RMSNorm(256, 1e-6).to("cuda", torch.bfloat16)
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    delta = torch.randn(37, 256, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(37, 256, device="cuda", dtype=torch.bfloat16)
    want_sum = residual + delta
    want = norm(want_sum)
    got, got_sum = norm.add_and_norm(delta.clone(), residual.clone())
    torch.testing.assert_close(got_sum, want_sum)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_cached_rope_table_equals_the_computed_values() -> None:
    from pie.engine.layers.rotary import CACHED_POSITIONS, Rotary

    rotary = Rotary(1.0 / (10000.0 ** (torch.arange(0, 64, 2, device="cuda").float() / 64)), 1.1)
    positions = torch.tensor([0, 5, 4095, CACHED_POSITIONS - 1], device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        cached = rotary.cos_sin(positions, dtype, int(positions.max()))
        computed = rotary.cos_sin(positions, dtype)
        assert all(torch.equal(a, b) for a, b in zip(cached, computed, strict=True))
