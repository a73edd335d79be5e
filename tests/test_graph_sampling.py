"""What the CUDA-graph decode step computes, checked on the CPU: the static-shape sampler a sampling graph
captures gives the eager sampler's tokens for every sampler mix (padding rows included) without reading
anything back; which steps get a sampling graph; bucket choice and padding; decode steps through the graph
runner without capture equal the plain engine's; the page-table section of the step's upload."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from checkpoints import VOCAB
from engine_helpers import SeqPager, logits_of, make_engine, random_prompts, rel_err
from test_engine_step import counting_readbacks

from pie.engine import brle
from pie.engine.attention.base import BatchLayout
from pie.engine.batch import ForwardBatch, OutputSpec, Probe, Request, Sampler
from pie.engine.batch_prep import PreparedBatch, prepare
from pie.engine.graphs import (
    GraphRunner,
    SamplerVariant,
    StepSampler,
    graph_buckets,
    pad_layout,
    sampler_variant,
    smallest_bucket,
    top_k_width,
)
from pie.engine.outputs import compute_outputs
from pie.engine.packing import Packer, Sections


@pytest.fixture(scope="module")
def engine(checkpoint_dir):  # type: ignore[no-untyped-def]
    return make_engine(checkpoint_dir("qwen3"), max_num_kv_pages=256, max_batch_size=64)


def _mask(i: int) -> list[int]:
    """A BRLE logit mask allowing a different third of the vocabulary per i."""
    allowed = np.zeros(VOCAB, bool)
    allowed[(i * 37) % VOCAB::3] = True
    return brle.encode(allowed)


MIXED = [Sampler("argmax"), Sampler("top_k", 0.8, top_k=5), Sampler("top_p", 1.2, top_p=0.7),
         Sampler("min_p", 0.9, min_p=0.2), Sampler("top_k_top_p", 1.0, top_k=20, top_p=0.9),
         Sampler("multinomial", 1.0), Sampler("top_k", 1e-7, top_k=3)]
MIXES: dict[str, tuple[list[Sampler], bool]] = {  # samplers cycled over the rows; logit masks on odd rows
    "greedy": ([Sampler("argmax"), Sampler("top_k", 0.0, top_k=4)], False),
    "greedy masked": ([Sampler("argmax")], True),
    "top_p only": ([Sampler("top_p", 0.7, top_p=0.9)], False),
    "mixed": (MIXED, False),
    "mixed masked": (MIXED, True),
    "wide top-k": ([Sampler("top_k", 1.0, top_k=100), Sampler("top_k", 1.0, top_k=VOCAB), Sampler("argmax")], False),
    "all random": ([Sampler("multinomial", 1.3), Sampler("min_p", 1.0, min_p=0.05)], True),
}


def _decode_step(engine, samplers: list[Sampler], masked: bool, n: int, seed: int) -> PreparedBatch:  # type: ignore[no-untyped-def]
    """n one-token decode requests (sequence i on page i) with seeds, prepared as the engine would."""
    ps = engine.info.page_size
    reqs = [Request(tokens=[(7 * i) % VOCAB], positions=[i % ps], page_ids=[i], last_page_len=i % ps + 1,
                    outputs=[OutputSpec(0, samplers[i % len(samplers)])], seed=seed * 1000 + i + (i % 3 << 40),
                    logit_mask=_mask(i) if masked and i % 2 else None) for i in range(n)]
    return prepare(ForwardBatch(reqs), engine.limits, random.Random(0))


def _sections(prep: PreparedBatch) -> Sections:
    return Sections(prep.packed, torch.from_numpy(prep.packed.host.copy()))


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("n", [1, 3, 16, 29])
def test_the_graph_sampler_gives_the_eager_tokens(engine, mix: str, n: int) -> None:  # type: ignore[no-untyped-def]
    samplers, masked = MIXES[mix]
    prep = _decode_step(engine, samplers, masked, n, seed=n)
    variant = sampler_variant(prep.outputs, n, VOCAB)
    assert variant is not None
    bucket = smallest_bucket(n, graph_buckets(64))
    assert bucket is not None and bucket >= n
    inp = _sections(prep)
    gen = torch.Generator().manual_seed(n)
    hidden = torch.randn(bucket, engine.model.spec.hidden_size, generator=gen) * 3  # rows >= n: padding
    eager = compute_outputs(engine.model, hidden[:n], prep.outputs, inp).tensor(torch.device("cpu"))
    sampler = StepSampler(64, VOCAB, torch.device("cpu"))
    sampler.fill(prep.outputs, inp, n, bucket)
    tokens = sampler.sample(engine.model.compute_logits(hidden), variant)
    assert tokens.shape == (bucket,) and tokens.dtype == torch.int32
    assert tokens[:n].tolist() == eager.tolist()
    if masked:  # the masks were applied, not just matched by luck
        for i in range(1, n, 2):
            assert brle.decode(_mask(i))[int(tokens[i])]


def test_a_refill_for_a_smaller_batch_leaves_no_stale_rows(engine) -> None:  # type: ignore[no-untyped-def]
    """The static buffers are shared by every bucket: a step after a wider masked one samples as if fresh."""
    sampler = StepSampler(64, VOCAB, torch.device("cpu"))
    wide = _decode_step(engine, MIXED, True, 29, seed=1)
    sampler.fill(wide.outputs, _sections(wide), 29, 32)
    narrow = _decode_step(engine, [Sampler("argmax")], True, 3, seed=2)
    variant = sampler_variant(narrow.outputs, 3, VOCAB)
    assert variant == SamplerVariant(False, 0, False, False, True)
    sampler.fill(narrow.outputs, _sections(narrow), 3, 4)
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(9))
    fresh = StepSampler(4, VOCAB, torch.device("cpu"))
    fresh.fill(narrow.outputs, _sections(narrow), 3, 4)
    assert torch.equal(sampler.sample(logits, variant), fresh.sample(logits, variant))


def test_the_graph_sampler_reads_nothing_back(engine) -> None:  # type: ignore[no-untyped-def]
    """fill + sample are launches only (a CUDA graph could not capture a read-back)."""
    prep = _decode_step(engine, MIXED, True, 13, seed=4)
    variant = sampler_variant(prep.outputs, 13, VOCAB)
    assert variant is not None
    inp = _sections(prep)
    sampler = StepSampler(16, VOCAB, torch.device("cpu"))
    logits = torch.randn(16, VOCAB)
    with counting_readbacks() as calls:
        sampler.fill(prep.outputs, inp, 13, 16)
        sampler.sample(logits, variant)
    assert sum(calls.values()) == 0, calls


def test_which_steps_get_a_sampling_graph(engine) -> None:  # type: ignore[no-untyped-def]
    mixed = _decode_step(engine, MIXED, False, 9, seed=0)
    assert sampler_variant(mixed.outputs, 9, VOCAB) == SamplerVariant(True, 32, True, True, False)
    greedy = _decode_step(engine, [Sampler("argmax"), Sampler("top_p", 0.0, top_p=0.5)], False, 4, seed=0)
    assert sampler_variant(greedy.outputs, 4, VOCAB) == SamplerVariant(False, 0, False, False, False)

    def step(outputs: list[OutputSpec], **kw: object) -> PreparedBatch:
        reqs = [Request(tokens=[1], positions=[0], page_ids=[i], last_page_len=1, outputs=outputs, **kw)  # type: ignore[arg-type]
                for i in range(3)]
        return prepare(ForwardBatch(reqs), engine.limits, random.Random(0))

    eager_only = {
        "a probe": step([OutputSpec(0, probe=Probe("logits")), OutputSpec(0, Sampler())]),
        "only a probe": step([OutputSpec(0, probe=Probe("entropy"))]),
        "two samplers": step([OutputSpec(0, Sampler()), OutputSpec(0, Sampler("top_k", 1.0, top_k=3))]),
        "several draws": step([OutputSpec(0, Sampler("multinomial", 1.0, draws=4))]),
        "penalties": step([OutputSpec(0, Sampler("top_k", 1.0, top_k=3, presence_penalty=0.5,
                                                 penalty_tokens=(1, 2)))]),
        "logit bias": step([OutputSpec(0, Sampler(logit_bias=((3, 1.0),)))]),
        "no outputs": step([]),
    }
    for name, prep in eager_only.items():
        assert sampler_variant(prep.outputs, 3, VOCAB) is None, name


def test_top_k_widths_are_few_and_cover_the_largest_k() -> None:
    assert [top_k_width(k, 151936) for k in (0, 1, 16, 17, 50, 64, 65, 1000)] == [0, 16, 16, 32, 64, 64, 128, 1024]
    assert top_k_width(600, 512) == 512  # never wider than the vocabulary
    assert all(top_k_width(k, 4096) >= k for k in range(1, 4097))


def test_buckets_and_padding() -> None:
    buckets = graph_buckets(256)
    assert [smallest_bucket(n, buckets) for n in (1, 3, 8, 9, 17, 255, 256, 257)] == [1, 4, 8, 16, 32, 256, 256, None]
    assert graph_buckets(5) == [1, 2, 4, 5] and graph_buckets(1) == [1]
    layout = BatchLayout(np.array([0, 1, 2], np.int32), np.array([0, 3, 4], np.int32),
                         np.array([7, 8, 9, 2], np.int32), np.array([5, 1], np.int32), np.array([37, 1], np.int32),
                         [None, None])
    padded = pad_layout(layout, 4, scratch_page=99)
    assert padded.num_requests == 4 and padded.is_pure_decode
    assert padded.kv_page_indptr.tolist() == [0, 3, 4, 5, 6]
    assert padded.kv_page_indices.tolist() == [7, 8, 9, 2, 99, 99]
    assert padded.kv_last_page_len.tolist() == [5, 1, 1, 1]
    assert all(a.dtype == np.int32 for a in (padded.kv_page_indptr, padded.kv_page_indices, padded.kv_last_page_len))
    assert pad_layout(layout, 2, 99) is layout


def test_a_section_added_to_a_packed_upload_reads_back_beside_the_others() -> None:
    packer = Packer()
    packer.add("a", np.arange(5))
    packer.add_floats("b", [0.5, -2.0])
    packed = packer.finish()
    more = packed.with_section("kv_pages", np.array([3, 1, 4], np.int32))
    assert packed.host.size == 7 and more.host.size == 10  # the original is left as it was
    sections = Sections(more, torch.from_numpy(more.host))
    assert sections.ints("a").tolist() == list(range(5))
    assert sections.floats("b").tolist() == [0.5, -2.0]
    assert sections.ints("kv_pages").tolist() == [3, 1, 4]


@pytest.fixture(scope="module")
def replayed(checkpoint_dir, engine):  # type: ignore[no-untyped-def]
    """(an engine whose pure-decode steps go through GraphRunner without capture, the plain engine)."""
    graphed = make_engine(checkpoint_dir("qwen3"), max_num_kv_pages=256, max_batch_size=64)
    graphed.graphs = GraphRunner(graphed.model, graphed.backend, graphed.kv, scratch_page=graphed.info.num_pages,
                                 max_batch_size=32, max_pages_per_batch=graphed.info.num_pages, capture=False)
    return graphed, engine


def _run(engine, prompts: list[list[int]], steps: list[object]) -> list[list[object]]:  # type: ignore[no-untyped-def]
    """Prefill the prompts, then one decode batch per entry of `steps` (a function of the row -> outputs),
    feeding each row's first sampled token back; every step's outputs."""
    pager = SeqPager(engine)
    engine.forward_batch(ForwardBatch([pager.request(i, p, []) for i, p in enumerate(prompts)]))
    last = [p[-1] for p in prompts]
    seen = []
    for outputs_of in steps:
        out = engine.forward_batch(ForwardBatch(
            [pager.request(i, [last[i]], outputs_of(i), seed=i, logit_mask=_mask(i) if i % 2 else None)  # type: ignore[operator]
             for i in range(len(prompts))])).outputs
        last = [o[-1] if isinstance(o[-1], int) else 5 for o in out]
        seen.append(out)
    return seen


@pytest.mark.parametrize("n", [1, 3, 13, 32])
def test_decode_through_the_graph_runner_equals_the_plain_engine(replayed, n: int) -> None:  # type: ignore[no-untyped-def]
    """Bucketing, padding rows on the scratch page, the static buffers and the sampler dispatch, run eagerly:
    the same tokens (and logits) as the engine without graphs, for plain sampler steps and probe steps."""
    graphed, plain = replayed
    prompts = random_prompts(n, VOCAB, 2, 20, seed=n)
    steps = [lambda i: [OutputSpec(0, MIXED[i % len(MIXED)])], lambda i: [OutputSpec(0, Sampler())],
             lambda i: [OutputSpec(0, probe=Probe("logits")), OutputSpec(0, MIXED[i % len(MIXED)])],
             lambda i: [OutputSpec(0, Sampler("top_k", 0.7, top_k=200 + i))]]
    before = dict(graphed.graphs.replays)
    got, want = _run(graphed, prompts, steps), _run(plain, prompts, steps)
    assert graphed.graphs.replays["forward"] - before["forward"] == 4
    assert graphed.graphs.replays["sampler"] - before["sampler"] == 3  # all but the probe step
    for g, w in zip(got, want, strict=True):
        for g_out, w_out in zip(g, w, strict=True):
            assert g_out[-1] == w_out[-1]
            if len(g_out) == 2:  # the raw logits probe
                assert rel_err(logits_of(g_out[0]), logits_of(w_out[0])) < 1e-5  # type: ignore[arg-type]
