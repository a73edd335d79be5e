"""Step-by-step greedy decoding through the engine and through transformers, with every step's logits.

A step is one engine batch: the first prefills every prompt, each later one
decodes one token per sequence. Each step samples argmax and also returns the
raw logits row, so tests compare the whole trajectory, not only the tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from engine_helpers import SeqPager, logits_of

from pie.engine.batch import ForwardBatch, OutputSpec, Probe, Sampler
from pie.engine.engine import Engine


def _argmax_and_logits(row: int) -> list[OutputSpec]:
    return [OutputSpec(row, Sampler("argmax")), OutputSpec(row, probe=Probe("logits"))]


def engine_greedy(engine: Engine, prompts: list[list[int]], num_new: int,
                  adapters: list[int | None] | None = None) -> tuple[list[list[int]], list[list[np.ndarray]]]:
    """All sequences in one batch per step -> (tokens [seq][step], logits [seq][step] float32 [vocab])."""
    adapters = adapters or [None] * len(prompts)
    pager = SeqPager(engine)
    tokens: list[list[int]] = [[] for _ in prompts]
    logits: list[list[np.ndarray]] = [[] for _ in prompts]
    feeds = [list(p) for p in prompts]
    for _ in range(num_new):
        reqs = [pager.request(i, feed, _argmax_and_logits(len(feed) - 1), adapter=a)
                for i, (feed, a) in enumerate(zip(feeds, adapters, strict=True))]
        for i, (tok, row) in enumerate(engine.forward_batch(ForwardBatch(reqs)).outputs):
            tokens[i].append(int(tok))  # type: ignore[arg-type]
            logits[i].append(logits_of(row))  # type: ignore[arg-type]
        feeds = [[seq[-1]] for seq in tokens]
    return tokens, logits


def hf_greedy_with_logits(model: Any, prompt: list[int], num_new: int) -> tuple[list[int], list[np.ndarray]]:
    """transformers' own generate (KV cache, one token per step) -> (tokens, each step's logits)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=num_new, min_new_tokens=num_new, do_sample=False, pad_token_id=0,
                             eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), [step[0].float().numpy() for step in out.logits]
