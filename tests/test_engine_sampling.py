"""Samplers and probes: allowed sets, seeds independent of batch companions, distribution shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from checkpoints import VOCAB
from engine_helpers import SeqPager, all_row_logits, make_engine, random_prompts

from pie.engine import brle, sampling
from pie.engine.batch import ForwardBatch, OutputSpec, Probe, Sampler


def _rows(n: int, **kw: object) -> sampling.SamplerRows:
    base = {"temperature": [1.0] * n, "top_k": [0] * n, "top_p": [1.0] * n, "min_p": [0.0] * n,
            "seeds": list(range(n)), "positions": [0] * n, "draws": [1] * n}
    base.update(kw)  # type: ignore[arg-type]
    return sampling.SamplerRows(**base)  # type: ignore[arg-type]


@pytest.fixture
def logits() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, 200, generator=gen) * 3


def _draw_many(logits: torch.Tensor, n: int, **kw: object) -> np.ndarray:
    rows = _rows(1, draws=[n], **kw)
    return np.array(sampling.sample(logits, rows, None)[0])


def test_top_k_never_leaves_the_k_best(logits: torch.Tensor) -> None:
    draws = _draw_many(logits, 4000, top_k=[5])
    allowed = set(logits[0].topk(5).indices.tolist())
    assert set(draws.tolist()) <= allowed
    assert len(set(draws.tolist())) == 5  # and all five do occur


def test_top_p_never_leaves_the_nucleus(logits: torch.Tensor) -> None:
    probs = torch.softmax(logits[0], -1)
    order = probs.argsort(descending=True)
    cum = probs[order].cumsum(0)
    nucleus = set(order[: int((cum < 0.6).sum()) + 1].tolist())
    draws = _draw_many(logits, 4000, top_p=[0.6])
    assert set(draws.tolist()) <= nucleus


def test_min_p_never_emits_tokens_below_the_threshold(logits: torch.Tensor) -> None:
    probs = torch.softmax(logits[0], -1)
    allowed = set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())
    draws = _draw_many(logits, 4000, min_p=[0.2])
    assert set(draws.tolist()) <= allowed


def test_top_k_top_p_combined(logits: torch.Tensor) -> None:
    draws = _draw_many(logits, 3000, top_k=[8], top_p=[0.5])
    assert set(draws.tolist()) <= set(logits[0].topk(8).indices.tolist())


def test_multinomial_frequencies_follow_the_distribution() -> None:
    logits = torch.tensor([[0.0, math.log(3.0), -1e9]])  # p = 0.25, 0.75, 0
    draws = _draw_many(logits, 20000)
    freq = np.bincount(draws, minlength=3) / draws.size
    assert abs(freq[1] - 0.75) < 0.02 and freq[2] == 0


def test_temperature_zero_is_argmax(logits: torch.Tensor) -> None:
    assert sampling.sample(logits, _rows(1, temperature=[0.0]), None) == [[int(logits.argmax())]]


def test_hash_uniform_is_uniform_and_seeded() -> None:
    n = 100_000
    u = sampling.hash_uniform(torch.full((n,), 7), torch.arange(n), torch.zeros(n, dtype=torch.long))
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01
    hist = torch.histc(u, bins=10, min=0, max=1) / n
    assert float((hist - 0.1).abs().max()) < 0.01
    again = sampling.hash_uniform(torch.full((n,), 7), torch.arange(n), torch.zeros(n, dtype=torch.long))
    other = sampling.hash_uniform(torch.full((n,), 8), torch.arange(n), torch.zeros(n, dtype=torch.long))
    assert torch.equal(u, again) and not torch.equal(u, other)


def test_seeded_request_is_independent_of_batch_companions(checkpoint_dir) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(checkpoint_dir("qwen3"))
    prompt, *others = random_prompts(6, VOCAB, 4, 20, seed=11)
    sampler = Sampler("top_p", temperature=1.3, top_p=0.95)

    def run(companions: list[list[int]], seed_first: bool) -> list[int]:
        pager = SeqPager(engine)
        reqs = [pager.request(i + 1, p, [OutputSpec(len(p) - 1, sampler)]) for i, p in enumerate(companions)]
        mine = pager.request(0, prompt, [OutputSpec(len(prompt) - 1, Sampler("multinomial", 1.0, draws=16))],
                             seed=1234)
        batch = [mine, *reqs] if seed_first else [*reqs, mine]
        result = engine.forward_batch(ForwardBatch(batch)).outputs
        return result[batch.index(mine)][0]  # type: ignore[return-value]

    alone = run([], True)
    assert run(others[:2], False) == alone
    assert run(others, True) == alone
    assert len(set(alone)) > 1  # temperature 1 over 512 tokens: the 16 draws are not all equal


def test_distribution_probe_shape_and_mass(checkpoint_dir) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(checkpoint_dir("qwen3"), max_dist_size=32)
    prompt = random_prompts(1, VOCAB, 10, 10, seed=12)[0]
    pager = SeqPager(engine)
    outs = [OutputSpec(9, probe=Probe("distribution", temperature=t, k=k)) for t, k in ((1.0, 0), (0.7, 5), (0.0, 3))]
    res = engine.forward_batch(ForwardBatch([pager.request(0, prompt, outs)])).outputs[0]
    for (ids, probs), expected_len in zip(res, (32, 5, 1), strict=True):  # type: ignore[misc]
        assert len(ids) == len(probs) == expected_len
        assert sum(probs) <= 1.0 + 1e-6
        assert probs == sorted(probs, reverse=True)
    logits = all_row_logits(engine, [prompt])[0][-1]
    assert res[0][0][0] == int(np.argmax(logits)) == res[2][0][0]  # type: ignore[index]


def test_logprob_entropy_probes_match_numpy(checkpoint_dir) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(checkpoint_dir("llama"))
    prompt = random_prompts(1, VOCAB, 8, 8, seed=13)[0]
    outs = [OutputSpec(7, probe=Probe("logprob", tokens=(17,))), OutputSpec(7, probe=Probe("logprobs", tokens=(1, 2, 3))),
            OutputSpec(7, probe=Probe("entropy")), OutputSpec(7, probe=Probe("embedding"))]
    res = engine.forward_batch(ForwardBatch([SeqPager(engine).request(0, prompt, outs)])).outputs[0]
    logits = all_row_logits(engine, [prompt])[0][-1].astype(np.float64)
    logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    assert res[0] == pytest.approx(logp[17], abs=1e-4)
    assert res[1] == pytest.approx(logp[[1, 2, 3]].tolist(), abs=1e-4)
    assert res[2] == pytest.approx(-(np.exp(logp) * logp).sum(), abs=1e-4)
    assert len(res[3]) == 4 * engine.model.spec.hidden_size  # type: ignore[arg-type]


def test_logit_mask_restricts_sampling(checkpoint_dir) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(checkpoint_dir("qwen3"))
    prompt = random_prompts(1, VOCAB, 6, 6, seed=14)[0]
    allowed = np.zeros(VOCAB, bool)
    allowed[[40, 41, 300]] = True
    out = [OutputSpec(5, Sampler("multinomial", 2.0, draws=200)), OutputSpec(5, Sampler("argmax"))]
    req = SeqPager(engine).request(0, prompt, out, logit_mask=brle.encode(allowed))
    draws, greedy = engine.forward_batch(ForwardBatch([req])).outputs[0]
    assert set(draws) <= {40, 41, 300}  # type: ignore[arg-type]
    logits = all_row_logits(engine, [prompt])[0][-1]
    assert greedy == max((40, 41, 300), key=lambda t: logits[t])
