"""From final hidden states to the values a batch asked for: sampled tokens and probes.

Three stages, so the device step synchronises once:
- `plan_outputs` (host, at prepare time): every output's row, sampler and
  probe parameters as int32/float32 sections of the step's one upload;
- `compute_outputs` (device): penalties, logit masks (shipped as bitmasks),
  sampling and every probe, vectorised over all rows at once, packed into one
  int32 tensor for the step's one download;
- `decode_outputs` (host): that buffer split back into one value per output.

Only the rows that have an output go through the LM head (a prefill of 2,000
tokens that samples once computes one row of logits, not 2,000).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pie.engine import brle, sampling
from pie.engine.batch import OutputValue, Probe, Request, Sampler, StepRows
from pie.engine.models.decoder import CausalLM
from pie.engine.packing import Packer, ResultPacker, Results, Sections
from pie.engine.validate import InvalidValue, check_logit_mask

_MASK32 = 0xFFFFFFFF


@dataclass
class OutputPlan:
    """Host-side description of a step's outputs; the parameters themselves are in the packed upload."""

    num_outputs: list[int]  # per request
    kinds: list[str]  # per output, in request order: "sampler" or the probe kind
    draws: list[int] = field(default_factory=list)  # per sampler output: tokens drawn (1 -> an int value)
    dist_k: list[int] = field(default_factory=list)  # per distribution probe: entries returned
    dist_kmax: int = 0
    logprob_counts: list[int] = field(default_factory=list)  # per logprob(s) probe: tokens scored
    num_logit_rows: int = 0  # distinct rows through the LM head
    num_logits_probes: int = 0
    num_embeddings: int = 0
    sampler_flags: tuple[int, bool, bool, bool, bool] = (0, False, False, False, False)
    num_masks: int = 0
    has_penalties: bool = False
    has_bias: bool = False
    num_steps: int = 0  # decode step rows (`ForwardBatch.steps`): the last sampler outputs, one draw each


_SamplerRow = tuple[tuple[float, int, float, float, float, float, float], int, bool]
_sampler_rows: dict[int, tuple[Sampler, _SamplerRow]] = {}
_MAX_CACHED = 4096


def _sampler_row(s: Sampler) -> _SamplerRow:
    """(temperature, top_k, top_p, min_p, presence, frequency, repetition), draws, penalized: the parameters
    its kind uses. Cached by identity: the runtime reuses one Sampler object for a decode loop's steps."""
    hit = _sampler_rows.get(id(s))
    if hit is not None and hit[0] is s:
        return hit[1]
    row = ((0.0 if s.kind == "argmax" else s.temperature,
            s.top_k if s.kind in ("top_k", "top_k_top_p") else 0,
            s.top_p if s.kind in ("top_p", "top_k_top_p") else 1.0,
            s.min_p if s.kind == "min_p" else 0.0,
            s.presence_penalty, s.frequency_penalty, s.repetition_penalty),
           s.draws if s.kind == "multinomial" else 1, s.penalizes)
    if len(_sampler_rows) >= _MAX_CACHED:
        _sampler_rows.clear()
    _sampler_rows[id(s)] = (s, row)  # holding `s` keeps its id from being reused while cached
    return row


class _Builder:
    """Collects the per-output host lists in one pass over the requests."""

    def __init__(self) -> None:
        self.kinds: list[str] = []
        self.num_outputs: list[int] = []
        self.logit_row: list[int] = []  # per output needing logits: its batch row
        self.s_out: list[int] = []  # sampler rows: index into logit_row
        self.s_req: list[int] = []
        self.s_row: list[int] = []
        self.s_par: list[tuple[float, int, float, float, float, float, float]] = []
        self.draws: list[int] = []
        self.pen_pairs: list[tuple[int, tuple[int, ...]]] = []  # (sampler row, history)
        self.bias: list[tuple[int, int, float]] = []
        self.dist: list[tuple[int, float, int]] = []  # (logit index, temperature, k)
        self.logprob: list[tuple[int, tuple[int, ...]]] = []
        self.entropy: list[int] = []
        self.logits: list[int] = []
        self.embed_rows: list[int] = []

    def sampler(self, i: int, row: int, s: Sampler) -> None:
        par, draws, penalized = _sampler_row(s)
        n = len(self.s_row)
        self.kinds.append("sampler")
        self.s_out.append(len(self.logit_row))
        self.logit_row.append(row)
        self.s_req.append(i)
        self.s_row.append(row)
        self.s_par.append(par)
        self.draws.append(draws)
        if penalized:
            self.pen_pairs.append((n, s.penalty_tokens))
        if s.logit_bias:
            self.bias += [(n, t, v) for t, v in s.logit_bias]

    def steps(self, steps: StepRows, first: int, qo_indptr: np.ndarray) -> int:
        """The step rows' sampler outputs, in bulk (they count as requests first, first + 1, ...); their
        kinds and output counts stay out of `kinds` / `num_outputs`: `decode_steps` reads them."""
        n = len(steps)
        rows = qo_indptr[first:first + n].tolist()
        start = len(self.logit_row)
        self.s_out += range(start, start + n)
        self.logit_row += rows
        self.s_req += range(first, first + n)
        self.s_row += rows
        params = [_sampler_row(s) for s in steps.samplers]
        sid = steps.sampler_ids.tolist()
        self.s_par += [params[k][0] for k in sid]
        self.draws += [1] * n  # a stream samples one token per step (checked by the runtime)
        special = [k for k, s in enumerate(steps.samplers) if params[k][2] or s.logit_bias]
        if special:  # penalties or a logit bias: per row, as `sampler` does
            base = len(self.s_row) - n
            for i, k in enumerate(sid):
                if k in special:
                    s = steps.samplers[k]
                    if params[k][2]:
                        self.pen_pairs.append((base + i, s.penalty_tokens))
                    self.bias += [(base + i, t, v) for t, v in s.logit_bias]
        return n

    def probe(self, row: int, p: Probe, vocab_size: int, max_dist_size: int) -> None:
        self.kinds.append(p.kind)
        if p.kind == "embedding":
            self.embed_rows.append(row)
            return
        li = len(self.logit_row)
        self.logit_row.append(row)
        if p.kind == "distribution":
            k = 1 if p.temperature <= 0.0 else min(p.k or max_dist_size, vocab_size)
            self.dist.append((li, p.temperature, k))
        elif p.kind in ("logprob", "logprobs"):
            self.logprob.append((li, p.tokens[:1] if p.kind == "logprob" else p.tokens))
        elif p.kind == "entropy":
            self.entropy.append(li)
        else:
            self.logits.append(li)


def plan_outputs(reqs: list[Request], qo_indptr: np.ndarray, positions: np.ndarray, seeds: list[int],
                 vocab_size: int, max_dist_size: int, packer: Packer, steps: StepRows | None = None) -> OutputPlan:
    """Every output's parameters into `packer`'s sections; `seeds` has one int64 seed per request (and
    step row). Step rows (after the requests) each sample one token at their row."""
    b = _Builder()
    b.num_outputs = [len(r.outputs) for r in reqs]
    for i, (r, base) in enumerate(zip(reqs, qo_indptr.tolist(), strict=False)):
        for o in r.outputs:
            if o.sampler is not None:
                b.sampler(i, base + o.index, o.sampler)
            else:
                assert o.probe is not None
                b.probe(base + o.index, o.probe, vocab_size, max_dist_size)
    num_steps = 0
    if steps is not None:
        num_steps = b.steps(steps, len(reqs), qo_indptr)
    plan = OutputPlan(b.num_outputs, b.kinds, num_steps=num_steps)
    masks = [r.logit_mask for r in reqs]
    if steps is not None:
        masks += steps.logit_masks or [None] * num_steps
    _pack_logit_rows(b, plan, packer)
    _pack_samplers(b, masks, positions, seeds, vocab_size, plan, packer)
    _pack_probes(b, plan, packer)
    return plan


def _pack_logit_rows(b: _Builder, plan: OutputPlan, packer: Packer) -> None:
    """Distinct rows through the LM head, and each output's index among them."""
    rows = np.asarray(b.logit_row, np.int64)
    if rows.size > 1 and not (rows[1:] > rows[:-1]).all():  # some rows repeat (or come out of order)
        rows, inverse = np.unique(rows, return_inverse=True)
        b.logit_row = inverse.tolist()  # output's logit index -> distinct row index
    else:  # one output per row, in order (every decode step): the rows are already distinct
        b.logit_row = list(range(rows.size))
    plan.num_logit_rows = rows.size
    packer.add("logit_rows", rows)
    if b.embed_rows:
        packer.add("embed_rows", np.asarray(b.embed_rows, np.int64))
        plan.num_embeddings = len(b.embed_rows)


def _pack_samplers(b: _Builder, masks: list[list[int] | None], positions: np.ndarray, seeds: list[int],
                   vocab_size: int, plan: OutputPlan, packer: Packer) -> None:
    if not b.s_row:
        return
    par = np.asarray(b.s_par, np.float64).reshape(-1, 7)
    s_seeds = np.asarray(seeds, np.int64)[b.s_req]
    ints = np.stack([np.asarray(b.logit_row, np.int64)[b.s_out], par[:, 1].astype(np.int64),
                     (s_seeds & _MASK32).astype(np.uint32).view(np.int32), s_seeds >> 32, positions[b.s_row]], 1)
    packer.add_columns(("s_logit", "s_top_k", "s_seed_lo", "s_seed_hi", "s_position"), ints)
    packer.add_columns(("s_temperature", "s_top_p", "s_min_p", "pen_presence", "pen_frequency", "pen_repetition"),
                       par[:, [0, 2, 3, 4, 5, 6]].astype(np.float32))
    top_k = ints[:, 1]
    num_rows, num_draws = len(b.draws), sum(b.draws)
    if num_draws == num_rows:  # one draw per row
        packer.add_columns(("draw_row", "draw_index"), np.stack([np.arange(num_rows), np.zeros(num_rows, np.int64)], 1))
    else:
        draws = np.asarray(b.draws, np.int64)
        draw_row = np.repeat(np.arange(num_rows), draws)
        starts = np.cumsum(draws) - draws
        packer.add_columns(("draw_row", "draw_index"),
                           np.stack([draw_row, np.arange(num_draws) - starts[draw_row]], 1))
    plan.draws = b.draws[:len(b.draws) - plan.num_steps]  # the requests' (decode_outputs reads them)
    greedy = par[:, 0] <= 0.0
    plan.sampler_flags = (int(top_k.max()), bool((par[:, 2] < 1.0).any()), bool((par[:, 3] > 0.0).any()),
                          bool(greedy.any()), bool((~greedy).any()))
    _pack_masks(b, masks, vocab_size, plan, packer)
    if b.pen_pairs:
        plan.has_penalties = True
        packer.add("pen_row", np.repeat([n for n, _ in b.pen_pairs], [len(h) for _, h in b.pen_pairs]))
        packer.add("pen_token", np.fromiter((t for _, h in b.pen_pairs for t in h), np.int64))
    if b.bias:
        plan.has_bias = True
        bias = np.asarray(b.bias, np.float64)
        packer.add("bias_row", bias[:, 0].astype(np.int64))
        packer.add("bias_token", bias[:, 1].astype(np.int64))
        packer.add_floats("bias_value", bias[:, 2])


def _pack_masks(b: _Builder, masks: list[list[int] | None], vocab_size: int, plan: OutputPlan,
                packer: Packer) -> None:
    """Each distinct request logit mask as packed bits; per sampler row the index of its mask (-1: none)."""
    mask_of: dict[int, int] = {}
    words: list[np.ndarray] = []
    num_words = -(-vocab_size // 32)
    for i in dict.fromkeys(b.s_req):
        runs = masks[i]
        if not runs:
            continue
        try:
            check_logit_mask(runs, vocab_size)
            allowed = brle.decode(runs)
        except (InvalidValue, ValueError) as e:
            raise InvalidValue(f"request {i}: logit mask {e}") from None
        # Shorter masks (tokenizer vocab < embedding rows) leave the padding ids disallowed.
        bits = np.packbits(allowed, bitorder="little")
        mask_of[i] = len(words)
        words.append(np.pad(bits, (0, num_words * 4 - bits.size)).view("<i4"))
    if not words:
        return
    plan.num_masks = len(words)
    packer.add("mask_words", np.concatenate(words))
    packer.add("s_mask", np.asarray([mask_of.get(i, -1) for i in b.s_req], np.int64))


def _pack_probes(b: _Builder, plan: OutputPlan, packer: Packer) -> None:
    to_row = np.asarray(b.logit_row, np.int64)
    if b.dist:
        plan.dist_k = [k for _, _, k in b.dist]
        plan.dist_kmax = max(plan.dist_k)
        packer.add("dist_logit", to_row[[li for li, _, _ in b.dist]])
        packer.add_floats("dist_temperature", [t for _, t, _ in b.dist])
    if b.logprob:
        plan.logprob_counts = [len(ts) for _, ts in b.logprob]
        packer.add("lp_logit", np.repeat(to_row[[li for li, _ in b.logprob]], plan.logprob_counts))
        packer.add("lp_token", np.fromiter((t for _, ts in b.logprob for t in ts), np.int64))
    if b.entropy:
        packer.add("ent_logit", to_row[b.entropy])
    if b.logits:
        plan.num_logits_probes = len(b.logits)
        packer.add("raw_logit", to_row[b.logits])


def compute_outputs(model: CausalLM, hidden: torch.Tensor, plan: OutputPlan, inp: Sections) -> ResultPacker:
    """All outputs on the device, packed for one download; launches only, no host sync."""
    out = ResultPacker()
    if plan.num_logit_rows:
        logits = model.compute_logits(hidden[inp.longs("logit_rows")])  # [L, vocab] float32
        if plan.draws or plan.num_steps:
            out.add("tokens", _sample(logits, plan, inp))
        if plan.dist_k:
            ids, probs = sampling.distributions(logits[inp.longs("dist_logit")], inp.floats("dist_temperature"),
                                                plan.dist_kmax)
            out.add("dist_ids", ids)
            out.add("dist_probs", probs)
        if plan.logprob_counts or "ent_logit" in inp.names:
            logprobs = torch.log_softmax(logits, dim=-1)
            if plan.logprob_counts:
                out.add("logprobs", logprobs[inp.longs("lp_logit"), inp.longs("lp_token")])
            if "ent_logit" in inp.names:
                out.add("entropy", sampling.entropy(logprobs[inp.longs("ent_logit")]))
        if plan.num_logits_probes:
            out.add("logits", logits[inp.longs("raw_logit")])
    if plan.num_embeddings:
        out.add("embeddings", hidden[inp.longs("embed_rows")])
    return out


def _sample(logits: torch.Tensor, plan: OutputPlan, inp: Sections) -> torch.Tensor:
    rows = logits[inp.longs("s_logit")]
    if plan.has_bias:
        rows = sampling.add_logit_bias(rows, inp.longs("bias_row"), inp.longs("bias_token"), inp.floats("bias_value"))
    if plan.has_penalties:
        rows = sampling.apply_penalties(rows, inp.longs("pen_row"), inp.longs("pen_token"),
                                        inp.floats("pen_presence"), inp.floats("pen_frequency"),
                                        inp.floats("pen_repetition"))
    allowed = None
    if plan.num_masks:
        vocab = rows.shape[-1]
        masks = sampling.unpack_bits(inp.ints("mask_words").view(plan.num_masks, -1), vocab)
        every = torch.ones(1, vocab, dtype=torch.bool, device=rows.device)
        allowed = torch.cat([every, masks])[inp.longs("s_mask") + 1]
    seeds = (inp.longs("s_seed_hi") << 32) | (inp.longs("s_seed_lo") & _MASK32)
    max_top_k, any_top_p, any_min_p, any_greedy, any_random = plan.sampler_flags
    params = sampling.SamplerInputs(
        temperature=inp.floats("s_temperature"), top_k=inp.longs("s_top_k"), top_p=inp.floats("s_top_p"),
        min_p=inp.floats("s_min_p"), seeds=seeds, positions=inp.longs("s_position"),
        draw_row=inp.longs("draw_row"), draw_index=inp.longs("draw_index"), max_top_k=max_top_k,
        any_top_p=any_top_p, any_min_p=any_min_p, any_greedy=any_greedy, any_random=any_random)
    return sampling.sample_tokens(rows, params, allowed)


def decode_steps(plan: OutputPlan, res: Results) -> np.ndarray | None:
    """The tokens the step rows sampled (the last `num_steps` draws), as one array; None without steps."""
    if not plan.num_steps:
        return None
    tokens = res.ints("tokens")
    return tokens[len(tokens) - plan.num_steps:].astype(np.int64)


def decode_outputs(plan: OutputPlan, res: Results, vocab: int, hidden_size: int) -> list[list[OutputValue]]:
    """The downloaded buffer as one value per output, grouped per request (step rows: `decode_steps`)."""
    tokens = res.ints("tokens").tolist()
    sampled: list[OutputValue] = []
    start = 0
    for d in plan.draws:
        sampled.append(tokens[start] if d == 1 else tokens[start:start + d])
        start += d
    dist: list[OutputValue] = []
    if plan.dist_k:
        ids = res.ints("dist_ids").reshape(-1, plan.dist_kmax).tolist()
        probs = res.floats("dist_probs").reshape(-1, plan.dist_kmax).tolist()
        dist = [(i[:k], p[:k]) for i, p, k in zip(ids, probs, plan.dist_k, strict=True)]
    lps = res.floats("logprobs").tolist()
    logprob_values, start = [], 0
    for n in plan.logprob_counts:
        logprob_values.append(lps[start:start + n])
        start += n
    entropies = res.floats("entropy").tolist()
    raw = res.floats("logits").astype("<f4").reshape(-1, vocab) if plan.num_logits_probes else None
    emb = res.floats("embeddings").astype("<f4").reshape(-1, hidden_size) if plan.num_embeddings else None
    cursors = dict.fromkeys(("sampler", "distribution", "logprob", "entropy", "logits", "embedding"), 0)
    values: list[OutputValue] = []
    for kind in plan.kinds:
        key = "logprob" if kind == "logprobs" else kind
        n = cursors[key]
        cursors[key] = n + 1
        if kind == "sampler":
            values.append(sampled[n])
        elif kind == "distribution":
            values.append(dist[n])
        elif key == "logprob":
            values.append(logprob_values[n][0] if kind == "logprob" else logprob_values[n])
        elif kind == "entropy":
            values.append(entropies[n])
        elif kind == "logits":
            assert raw is not None
            values.append(raw[n].tobytes())
        else:
            assert emb is not None
            values.append(emb[n].tobytes())
    per_request: list[list[OutputValue]] = []
    start = 0
    for count in plan.num_outputs:
        per_request.append(values[start:start + count])
        start += count
    return per_request
