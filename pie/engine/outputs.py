"""From final hidden states to the values a batch asked for: sampled tokens and probes.

Only the rows that have an output go through the LM head (a prefill of 2,000
tokens that samples once computes one row of logits, not 2,000).
"""

from __future__ import annotations

import numpy as np
import torch

from pie.engine import sampling
from pie.engine.batch import OutputValue
from pie.engine.batch_prep import OutputRow, PreparedBatch
from pie.engine.models.decoder import CausalLM


def compute_outputs(model: CausalLM, hidden: torch.Tensor, prep: PreparedBatch, num_requests: int,
                    max_dist_size: int) -> list[list[OutputValue]]:
    values: dict[int, OutputValue] = {}
    rows = prep.outputs
    dev = hidden.device
    needs_logits = [i for i, o in enumerate(rows) if not (o.spec.probe and o.spec.probe.kind == "embedding")]
    if needs_logits:
        row_idx = torch.tensor([rows[i].row for i in needs_logits], device=dev)
        logits = model.compute_logits(hidden[row_idx])  # [n, vocab] float32
        local = {i: n for n, i in enumerate(needs_logits)}
        values |= _sampled(logits, rows, local, prep, dev)
        values |= _probed(logits, rows, local, max_dist_size)
    for i, o in enumerate(rows):
        if o.spec.probe is not None and o.spec.probe.kind == "embedding":
            values[i] = hidden[o.row].float().cpu().numpy().astype("<f4").tobytes()
    per_request: list[list[OutputValue]] = [[] for _ in range(num_requests)]
    for i, o in enumerate(rows):
        per_request[o.request].append(values[i])
    return per_request


def _sampled(logits: torch.Tensor, rows: list[OutputRow], local: dict[int, int], prep: PreparedBatch,
             dev: torch.device) -> dict[int, OutputValue]:
    which = [i for i, o in enumerate(rows) if o.spec.sampler is not None]
    if not which:
        return {}
    specs = [rows[i].spec.sampler for i in which]
    params = sampling.SamplerRows(
        temperature=[0.0 if s.kind == "argmax" else s.temperature for s in specs],  # type: ignore[union-attr]
        top_k=[s.top_k if s.kind in ("top_k", "top_k_top_p") else 0 for s in specs],  # type: ignore[union-attr]
        top_p=[s.top_p if s.kind in ("top_p", "top_k_top_p") else 1.0 for s in specs],  # type: ignore[union-attr]
        min_p=[s.min_p if s.kind == "min_p" else 0.0 for s in specs],  # type: ignore[union-attr]
        seeds=[rows[i].seed for i in which],
        positions=[rows[i].position for i in which],
        draws=[s.draws if s.kind == "multinomial" else 1 for s in specs],  # type: ignore[union-attr]
    )
    allowed = None
    if prep.logit_masks and any(rows[i].request in prep.logit_masks for i in which):
        vocab = logits.shape[-1]
        mask = np.ones((len(which), vocab), bool)
        for n, i in enumerate(which):
            m = prep.logit_masks.get(rows[i].request)
            if m is not None:
                mask[n] = m
        allowed = torch.from_numpy(mask).to(dev)
    sel = torch.tensor([local[i] for i in which], device=dev)
    drawn = sampling.sample(logits[sel], params, allowed)
    return {i: (toks[0] if len(toks) == 1 and params.draws[n] == 1 else toks)
            for n, (i, toks) in enumerate(zip(which, drawn, strict=True))}


def _probed(logits: torch.Tensor, rows: list[OutputRow], local: dict[int, int],
            max_dist_size: int) -> dict[int, OutputValue]:
    which = [i for i, o in enumerate(rows) if o.spec.probe is not None and o.spec.probe.kind != "embedding"]
    if not which:
        return {}
    sel = torch.tensor([local[i] for i in which], device=logits.device)
    probe_logits = logits[sel]
    logprobs = torch.log_softmax(probe_logits, dim=-1)
    out: dict[int, OutputValue] = {}
    entropies: list[float] | None = None
    for n, i in enumerate(which):
        p = rows[i].spec.probe
        assert p is not None
        if p.kind == "distribution":
            out[i] = sampling.distribution(probe_logits[n], p.temperature, p.k or max_dist_size)
        elif p.kind == "logprob":
            out[i] = float(logprobs[n, p.tokens[0]])
        elif p.kind == "logprobs":
            out[i] = logprobs[n, list(p.tokens)].tolist()
        elif p.kind == "entropy":
            if entropies is None:
                entropies = sampling.entropy(logprobs).tolist()
            out[i] = entropies[n]
        elif p.kind == "logits":
            out[i] = probe_logits[n].cpu().numpy().astype("<f4").tobytes()
    return out
