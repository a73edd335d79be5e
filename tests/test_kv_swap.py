"""KV swap to the host pool: a context swapped out and back in predicts exactly as before."""

from __future__ import annotations

import numpy as np
import pytest
from checkpoints import VOCAB
from engine_helpers import SeqPager, logits_of, make_engine, random_prompts

from pie.engine.batch import ForwardBatch, OutputSpec, Probe, Request
from pie.errors import BatchError


def _next_logits(engine, pages: list[int], kv_len: int, token: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    ps = engine.info.page_size
    req = Request([token], [kv_len], pages[: kv_len // ps + 1], kv_len % ps + 1, [OutputSpec(0, probe=Probe("logits"))])
    return logits_of(engine.forward_batch(ForwardBatch([req])).outputs[0][0])  # type: ignore[arg-type]


def test_swap_out_and_in_restores_the_distribution(checkpoint_dir) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(checkpoint_dir("qwen3"), kv_page_size=4, max_num_kv_pages=64, swap_pool_size=16)
    assert engine.info.num_swap_slots == 16
    prompt, other = random_prompts(2, VOCAB, 22, 22, seed=9)
    pager = SeqPager(engine)
    engine.forward_batch(ForwardBatch([pager.request(0, prompt, [])]))
    pages = pager.pages[0]  # 6 pages, the last holding 2 tokens
    # Keep one more slot on the last page for the probe token: kv_len 22 -> 23.
    before = _next_logits(engine, pages, 22, 7)
    # Swap out, let another sequence overwrite those device pages, then swap into different pages.
    engine.forward_batch(ForwardBatch([], swap_out=[(p, i) for i, p in enumerate(pages)]))
    clobber = Request(other, list(range(22)), pages, 2, [])
    engine.forward_batch(ForwardBatch([clobber]))
    assert not np.allclose(_next_logits(engine, pages, 22, 7), before)
    new_pages = list(range(40, 40 + len(pages)))
    engine.forward_batch(ForwardBatch([], swap_in=[(i, p) for i, p in enumerate(new_pages)]))
    after = _next_logits(engine, new_pages, 22, 7)
    np.testing.assert_array_equal(after, before)


def test_swap_errors_name_the_pool(checkpoint_dir) -> None:  # type: ignore[no-untyped-def]
    no_pool = make_engine(checkpoint_dir("qwen3"), max_num_kv_pages=8)
    with pytest.raises(BatchError, match="host swap pool has 0 slots"):
        no_pool.forward_batch(ForwardBatch([], swap_out=[(0, 0)]))
    pool = make_engine(checkpoint_dir("qwen3"), max_num_kv_pages=8, swap_pool_size=2)
    with pytest.raises(BatchError, match="swap slot 2 is out of range"):
        pool.forward_batch(ForwardBatch([], swap_in=[(2, 0)]))
    with pytest.raises(BatchError, match="swap-out source page id 8"):
        pool.forward_batch(ForwardBatch([], swap_out=[(8, 0)]))


def test_swap_pool_sized_from_memory_budget(checkpoint_dir) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(checkpoint_dir("qwen3"), max_num_kv_pages=8, cpu_mem_budget_in_gb=0.001)
    assert engine.info.num_swap_slots == int(0.001 * (1 << 30)) // engine.info.kv_bytes_per_page
