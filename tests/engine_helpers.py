"""Drive an Engine the way the runtime does (pages, positions, outputs), for tests.

`SeqPager` hands out pages per sequence like a minimal runtime would; the
helpers then build real `ForwardBatch`es. The transformers side of every
comparison runs the same checkpoint through `AutoModelForCausalLM`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pie.engine.batch import ForwardBatch, OutputSpec, Probe, Request, Sampler
from pie.engine.config import EngineConfig
from pie.engine.engine import Engine


def make_engine(model_dir: Path | str, **overrides: Any) -> Engine:
    cfg = {"model": str(model_dir), "device": "cpu", "max_num_kv_pages": 512, **overrides}
    return Engine(EngineConfig(**cfg))


class SeqPager:
    """Pages for a set of sequences, allocated sequentially from the pool."""

    def __init__(self, engine: Engine, first_page: int = 0) -> None:
        self.page_size = engine.info.page_size
        self.num_pages = engine.info.num_pages
        self.next_page = first_page
        self.pages: dict[int, list[int]] = {}
        self.kv_len: dict[int, int] = {}

    def request(self, seq: int, tokens: list[int], outputs: list[OutputSpec], positions: list[int] | None = None,
                **kw: Any) -> Request:
        """A request appending `tokens` to sequence `seq` (allocating pages as needed); at the slot indices,
        unless `positions` are given."""
        start = self.kv_len.get(seq, 0)
        end = start + len(tokens)
        pages = self.pages.setdefault(seq, [])
        while len(pages) * self.page_size < end:
            assert self.next_page < self.num_pages, "test pool too small"
            pages.append(self.next_page)
            self.next_page += 1
        self.kv_len[seq] = end
        if positions is None:
            positions = list(range(start, end))
        return Request(tokens=list(tokens), positions=list(positions), page_ids=list(pages),
                       last_page_len=(end - 1) % self.page_size + 1, outputs=outputs, **kw)


def logits_of(value: bytes) -> np.ndarray:
    return np.frombuffer(value, dtype="<f4")


def all_row_logits(engine: Engine, prompts: list[list[int]], **req_kw: Any) -> list[np.ndarray]:
    """Prefill every prompt in one batch; logits of every row, [len(prompt), vocab] each."""
    pager = SeqPager(engine)
    reqs = [pager.request(i, p, [OutputSpec(j, probe=Probe("logits")) for j in range(len(p))], **req_kw)
            for i, p in enumerate(prompts)]
    res = engine.forward_batch(ForwardBatch(reqs))
    return [np.stack([logits_of(v) for v in out]) for out in res.outputs]  # type: ignore[arg-type]


def greedy_generate(engine: Engine, prompts: list[list[int]], num_new: int) -> list[list[int]]:
    """Prefill all prompts in one batch, then decode all sequences together, greedily."""
    pager = SeqPager(engine)
    argmax = [OutputSpec(0, Sampler("argmax"))]
    reqs = [pager.request(i, p, [OutputSpec(len(p) - 1, Sampler("argmax"))]) for i, p in enumerate(prompts)]
    out = [[int(v[0])] for v in engine.forward_batch(ForwardBatch(reqs)).outputs]  # type: ignore[arg-type]
    for _ in range(num_new - 1):
        reqs = [pager.request(i, [seq[-1]], argmax) for i, seq in enumerate(out)]
        for seq, v in zip(out, engine.forward_batch(ForwardBatch(reqs)).outputs, strict=True):
            seq.append(int(v[0]))  # type: ignore[arg-type]
    return out


def hf_logits(model: Any, prompt: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float().numpy()


def hf_greedy(model: Any, prompt: list[int], num_new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=num_new, min_new_tokens=num_new, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref|: the tolerance measure used across the engine tests."""
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def random_prompts(n: int, vocab: int, min_len: int, max_len: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    # ids >= 3 keep the special tokens (0..2) out of prompts
    return [rng.integers(3, vocab, int(rng.integers(min_len, max_len + 1))).tolist() for _ in range(n)]
