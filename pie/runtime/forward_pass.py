"""A forward pass as the SDK sends it (`PassDict`), checked and turned into a scheduler `Job`.

Everything the engine would refuse is refused here, per pass, with the
numbers and the fix: the engine checks a whole batch at once, so one bad pass
would otherwise fail every pass batched with it. The range checks are the
engine's own (`pie.engine.validate`), so a batch built from passes read here
can go to the engine marked `validated`.

Output values, one per slot (`slot_values`):
- sampler slot: the engine's value for its row (an int, or a list of ints for
  `draws > 1`); with several rows, the list of all their tokens;
- probe slot: the engine's value (distribution -> (ids, probs), logprob ->
  float, logprobs -> list, entropy -> float, logits/embedding -> bytes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from inferlet._host import HostError, PassDict, SlotDict
from pie.engine import validate
from pie.engine.batch import PROBE_KINDS, SAMPLER_KINDS, OutputSpec, Probe, Sampler
from pie.runtime.context import Context
from pie.runtime.images import ImagePlacement
from pie.runtime.jobs import Job

if TYPE_CHECKING:
    from pie.runtime.runtime import ModelRuntime

MAX_CACHED_SAMPLERS = 64


class Outputs(NamedTuple):
    specs: list[OutputSpec]  # the engine outputs, in slot order
    slot_rows: list[tuple[int, int]]  # per slot: (first output, number of outputs)
    sampled: int  # tokens the samplers draw (what the token budget counts)


class PassReader:
    """Reads one instance's passes; the samplers it has seen are kept by the model (`ModelRuntime.samplers`)."""

    def job(self, m: ModelRuntime, c: Context, spec: PassDict, outputs: Outputs, adapter: int | None = None,
            images: Sequence[ImagePlacement] = ()) -> Job:
        """Check the inputs against the context and the model; record them on the context; the job.

        `adapter`: the engine slot of the pass's LoRA adapter (the host resolves the SDK's handle).
        `images`: the images the pass places (`pie.runtime.images.pass_images`)."""
        tokens, positions = spec["tokens"], spec["positions"]  # checked by `outputs`
        n = len(tokens)
        kv_len, capacity = c.kv_len, c.num_pages * m.page_size
        if kv_len + n > capacity:
            raise HostError(f"KV capacity exceeded: kv_len {kv_len} + {n} input tokens > {c.num_pages} pages x "
                            f"page size {m.page_size} = {capacity}; reserve "
                            f"{-(-(kv_len + n - capacity) // m.page_size)} more working pages first")
        mask = spec.get("attention_mask")
        if mask is not None:
            _check_attention_mask(mask, n, kv_len + n, m.max_batch_tokens)
        logit_mask = spec.get("logit_mask") or None
        if logit_mask is not None:
            _check_logit_mask(logit_mask, m.vocab_size)
        seed = spec.get("seed")
        if seed is not None and (type(seed) is not int):
            raise HostError(f"seed must be an integer, got {seed!r}")
        zo_seed = spec.get("zo_seed")
        if zo_seed is not None and type(zo_seed) is not int:
            raise HostError(f"zo_seed must be an integer, got {zo_seed!r}")
        if zo_seed is not None and adapter is None:
            raise HostError("zo_seed perturbs the pass's adapter, and this pass has none; set one (fwd.adapter(a))")
        # KV written under an adapter is not the base model's: like a masked pass, never shared or recomputed.
        c.append(tokens, positions, custom_kv=mask is not None or adapter is not None, images=images)
        return Job(c, kv_len, kv_len + n, outputs.specs, attention_mask=mask, logit_mask=logit_mask,
                   adapter=adapter, seed=None if seed is None else validate.seed64(seed),
                   zo_seed=None if zo_seed is None else validate.seed64(zo_seed))

    def outputs(self, spec: PassDict, m: ModelRuntime) -> Outputs:
        """Check the inputs' shape and the slots; the engine outputs they ask for."""
        tokens, positions = spec.get("tokens") or [], spec.get("positions") or []
        if not isinstance(tokens, list) or not isinstance(positions, list):
            raise HostError("tokens and positions must be lists of integers")
        n = len(tokens)
        if n == 0:
            raise HostError("empty forward pass: give at least one input token")
        if len(positions) != n:
            raise HostError(f"the pass has {n} tokens but {len(positions)} positions; give one position per token")
        if not all(type(t) is int for t in tokens) or not all(type(p) is int for p in positions):
            raise HostError("tokens and positions must be lists of integers")
        try:
            validate.check_ids(tokens, m.vocab_size, "token id", "the model's vocabulary")
            validate.check_ids(positions, validate.MAX_POSITION, "position", "the positions the engine runs")
        except validate.InvalidValue as e:
            raise HostError(str(e)) from None
        return self._slots(spec.get("slots") or [], n, m)

    def _slots(self, slots: list[SlotDict], n: int, m: ModelRuntime) -> Outputs:
        """Slots -> engine outputs, each slot's (first output, count), and the number of sampled tokens."""
        outputs: list[OutputSpec] = []
        slot_rows: list[tuple[int, int]] = []
        sampled = embeds = 0
        for k, slot in enumerate(slots):
            first = len(outputs)
            if not isinstance(slot, Mapping):
                raise HostError(f"slot {k} must be a dict with `sampler` + `indices` or `probe` + `index`")
            if "sampler" in slot:
                sampler = self._sampler(k, slot["sampler"], m)
                indices = slot.get("indices") or []
                if not indices:
                    raise HostError(f"slot {k}: a sampler slot needs at least one row in `indices`")
                outputs += [OutputSpec(_row(k, i, n), sampler=sampler) for i in indices]
                sampled += len(indices) * sampler.draws
            elif "probe" in slot:
                probe = _probe(k, slot["probe"], m)
                embeds += probe.kind == "embedding"
                outputs.append(OutputSpec(_row(k, slot.get("index", 0), n), probe=probe))
            else:
                raise HostError(f"slot {k} has neither `sampler` nor `probe`")
            slot_rows.append((first, len(outputs) - first))
        if embeds > m.max_num_embeds:
            raise HostError(f"the pass asks for {embeds} embeddings, over max_num_embeds = {m.max_num_embeds}")
        return Outputs(outputs, slot_rows, sampled)

    def _sampler(self, k: int, d: Mapping[str, Any], m: ModelRuntime) -> Sampler:
        cache = m.samplers
        try:
            key = tuple(d.items())
            sampler = cache.get(key)
        except (TypeError, AttributeError):  # not a flat dict of numbers (a history, a bias): read it each time
            return _sampler(k, d, m.vocab_size)
        if sampler is None:
            if len(cache) >= MAX_CACHED_SAMPLERS:
                cache.clear()
            sampler = cache[key] = _sampler(k, d, m.vocab_size)
        return sampler


def slot_values(values: list[Any], slot_rows: list[tuple[int, int]]) -> list[Any]:
    """The engine's values (one per output) regrouped as one value per slot."""
    return [values[first] if count == 1 else _flat(values[first:first + count]) for first, count in slot_rows]


def _flat(values: list[Any]) -> list[Any]:
    flat: list[Any] = []
    for v in values:
        flat += v if isinstance(v, list) else [v]
    return flat


def _check_attention_mask(mask: list[list[int]], n: int, kv_len: int, max_rows: int) -> None:
    if not isinstance(mask, list) or not all(_is_int_list(row) for row in mask):
        raise HostError("attention_mask must be a list of BRLE rows (lists of run lengths)")
    if len(mask) == n and n > max_rows:
        raise HostError(f"a masked pass of {n} tokens is over max_batch_tokens = {max_rows} (masked passes are "
                        "not split into chunks); send it in smaller passes")
    try:
        validate.check_attention_mask(mask, n, kv_len)
    except validate.InvalidValue as e:
        raise HostError(f"attention_mask {e}") from None


def _check_logit_mask(mask: list[int], vocab: int) -> None:
    if not _is_int_list(mask):
        raise HostError("logit_mask must be a BRLE: a list of run lengths")
    try:
        validate.check_logit_mask(mask, vocab)
    except validate.InvalidValue as e:
        raise HostError(f"logit_mask {e}") from None


def _row(k: int, index: int, n: int) -> int:
    if not isinstance(index, int) or not 0 <= index < n:
        raise HostError(f"slot {k} reads row {index!r}, but the pass has {n} input rows [0, {n})")
    return index


def _sampler(k: int, d: Mapping[str, Any], vocab_size: int) -> Sampler:
    if not isinstance(d, Mapping):
        raise HostError(f"slot {k}: `sampler` must be a dict such as {{'kind': 'argmax'}}, got {d!r}")
    kind = d.get("kind", "argmax")
    if kind not in SAMPLER_KINDS:
        raise HostError(f"slot {k}: unknown sampler {kind!r}; use one of {sorted(SAMPLER_KINDS)}")
    try:
        s = Sampler(kind, float(d.get("temperature", 1.0)), int(d.get("top_k", 0)), float(d.get("top_p", 1.0)),
                    float(d.get("min_p", 0.0)), int(d.get("draws", 1)),
                    float(d.get("presence_penalty", 0.0)), float(d.get("frequency_penalty", 0.0)),
                    float(d.get("repetition_penalty", 1.0)), _logit_bias(d.get("logit_bias")),
                    tuple(_int(t) for t in d.get("penalty_tokens") or ()))
        validate.check_sampler(s, vocab_size)
    except (TypeError, ValueError, OverflowError) as error:  # InvalidValue is a ValueError
        raise HostError(f"slot {k}: sampler {dict(d)}: {error}") from None
    return s


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """{token: bias} (JSON keys may be strings) or [[token, bias], ...] -> sorted (token, bias) pairs."""
    if not value:
        return ()
    pairs = value.items() if isinstance(value, Mapping) else value
    return tuple(sorted((_int(t), float(b)) for t, b in pairs))


def _int(value: Any) -> int:
    """An int, or a str of one (JSON object keys); never a float or a bool."""
    if type(value) is int:
        return value
    if isinstance(value, str):
        return int(value)
    raise TypeError(f"expected an integer, got {value!r}")


def _probe(k: int, d: Mapping[str, Any], m: ModelRuntime) -> Probe:
    if not isinstance(d, Mapping):
        raise HostError(f"slot {k}: `probe` must be a dict such as {{'kind': 'entropy'}}, got {d!r}")
    kind = d.get("kind")
    if kind not in PROBE_KINDS:
        raise HostError(f"slot {k}: unknown probe {kind!r}; use one of {sorted(PROBE_KINDS)}")
    try:
        tokens = tuple(int(t) for t in d.get("tokens") or ())
        probe = Probe(kind, float(d.get("temperature", 1.0)), int(d.get("k", 0)), tokens)
        validate.check_probe(probe, m.vocab_size, m.max_dist_size)
    except (TypeError, ValueError, OverflowError) as error:
        raise HostError(f"slot {k}: probe {dict(d)}: {error}") from None
    return probe


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is int for v in value)
