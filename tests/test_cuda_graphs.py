"""CUDA-graph decode equals eager decode at temperature 0, for batch sizes 1..256."""

from __future__ import annotations

import numpy as np
import pytest
from checkpoints import VOCAB
from engine_helpers import SeqPager, logits_of, make_engine, random_prompts, rel_err

from pie.engine.batch import ForwardBatch, OutputSpec, Probe, Sampler
from pie.engine.graphs import graph_buckets

GPU_SHAPES = {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
              "intermediate_size": 512}
BATCH_SIZES = [1, 2, 3, 5, 8, 13, 16, 17, 31, 32, 63, 64, 100, 128, 129, 200, 255, 256]


def test_buckets_cover_every_size() -> None:
    buckets = graph_buckets(256)
    assert buckets[0] == 1 and buckets[-1] == 256
    assert all(any(b >= n for b in buckets) for n in range(1, 257))


@pytest.fixture(scope="module")
def engines(checkpoint_dir):  # type: ignore[no-untyped-def]
    d = checkpoint_dir("qwen3", **GPU_SHAPES)
    kw = {"device": "cuda:0", "activation_dtype": "bfloat16", "attention_backend": "flashinfer",
          "max_num_kv_pages": 8192, "max_batch_size": 256}
    return make_engine(d, use_cuda_graphs=True, **kw), make_engine(d, use_cuda_graphs=False, **kw)


def _decode(engine, prompts: list[list[int]], steps: int):  # type: ignore[no-untyped-def]
    """Prefill eagerly, then `steps` pure-decode batches; tokens and last-step logits per sequence."""
    pager = SeqPager(engine)
    first = engine.forward_batch(ForwardBatch(
        [pager.request(i, p, [OutputSpec(len(p) - 1, Sampler())]) for i, p in enumerate(prompts)])).outputs
    tokens = [[int(o[0])] for o in first]
    logits = []
    for _ in range(steps):
        out = engine.forward_batch(ForwardBatch(
            [pager.request(i, [t[-1]], [OutputSpec(0, Sampler()), OutputSpec(0, probe=Probe("logits"))])
             for i, t in enumerate(tokens)])).outputs
        for t, o in zip(tokens, out, strict=True):
            t.append(int(o[0]))
        logits = [logits_of(o[1]) for o in out]
    return tokens, np.stack(logits)


@pytest.mark.gpu
@pytest.mark.parametrize("bs", BATCH_SIZES)
def test_graph_decode_equals_eager(engines, bs: int) -> None:  # type: ignore[no-untyped-def]
    graphed, eager = engines
    assert graphed.graphs is not None and eager.graphs is None
    prompts = random_prompts(bs, VOCAB, 3, 40, seed=bs)
    g_tokens, g_logits = _decode(graphed, prompts, 4)
    e_tokens, e_logits = _decode(eager, prompts, 4)
    assert g_tokens == e_tokens
    assert rel_err(g_logits, e_logits) < 1e-2


def _greedy_decode(engine, prompts: list[list[int]], steps: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """Prefill, then `steps` decode batches whose only output is a greedy sampler per request: the steps
    that replay the sampling graph as well as the forward graph."""
    pager = SeqPager(engine)
    first = engine.forward_batch(ForwardBatch(
        [pager.request(i, p, [OutputSpec(len(p) - 1, Sampler())]) for i, p in enumerate(prompts)])).outputs
    tokens = [[int(o[0])] for o in first]
    for _ in range(steps):
        out = engine.forward_batch(ForwardBatch(
            [pager.request(i, [t[-1]], [OutputSpec(0, Sampler())]) for i, t in enumerate(tokens)])).outputs
        for t, o in zip(tokens, out, strict=True):
            t.append(int(o[0]))
    return tokens


@pytest.mark.gpu
@pytest.mark.parametrize("bs", BATCH_SIZES)
def test_whole_step_graph_decode_equals_eager(engines, bs: int) -> None:  # type: ignore[no-untyped-def]
    graphed, eager = engines
    prompts = random_prompts(bs, VOCAB, 3, 40, seed=1000 + bs)
    before = graphed.graphs.replays["sampler"]
    assert _greedy_decode(graphed, prompts, 4) == _greedy_decode(eager, prompts, 4)
    assert graphed.graphs.replays["sampler"] - before == 4  # every decode step sampled inside a graph


@pytest.mark.gpu
@pytest.mark.parametrize("mix", ["mixed", "mixed masked", "wide top-k", "all random", "greedy masked"])
def test_a_captured_sampler_equals_the_eager_sampler(engines, mix: str) -> None:  # type: ignore[no-untyped-def]
    """The sampling a graph captures, replayed on the same logits as the eager sampler: the same tokens,
    also after the static buffers are refilled for another step."""
    import torch
    from test_graph_sampling import MIXES, _decode_step

    from pie.engine.graphs import StepSampler, sampler_variant
    from pie.engine.outputs import _sample
    from pie.engine.packing import Sections

    graphed, _ = engines
    samplers, masked = MIXES[mix]
    n, bucket = 29, 32
    dev = torch.device("cuda:0")
    logits = torch.randn(bucket, VOCAB, device=dev, generator=torch.Generator(dev).manual_seed(5)) * 3
    sampler = StepSampler(bucket, VOCAB, dev)
    graph, out = None, None
    for seed in (1, 2):
        prep = _decode_step(graphed, samplers, masked, n, seed)
        variant = sampler_variant(prep.outputs, n, VOCAB)
        assert variant is not None
        inp = Sections(prep.packed, torch.from_numpy(prep.packed.host.copy()).to(dev))
        sampler.fill(prep.outputs, inp, n, bucket)
        if graph is None:
            sampler.sample(logits, variant)  # warm-up, then capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = sampler.sample(logits, variant)
        graph.replay()
        assert out is not None
        assert out[:n].tolist() == _sample(logits[:n], prep.outputs, inp).tolist()


@pytest.mark.gpu
def test_a_graphed_decode_step_has_no_hidden_sync(engines) -> None:  # type: ignore[no-untyped-def]
    """Forward graph + sampling graph (greedy, mixed) and forward graph + eager outputs (probes): the step's
    one event sync only."""
    import torch
    from test_engine_step import STEPS, _decode_batch

    graphed, _ = engines
    for case in ("greedy", "top_p", "mixed samplers", "probes"):
        batch = _decode_batch(graphed, STEPS[case])
        graphed.forward_batch(batch)  # captures the step's sampling variant on first use (a capture syncs)
        torch.cuda.synchronize()
        before = dict(graphed.graphs.replays)
        torch.cuda.set_sync_debug_mode("error")
        try:
            graphed.forward_batch(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert graphed.graphs.replays["forward"] == before["forward"] + 1, case
