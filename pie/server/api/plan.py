"""A validated request + its model -> the `openai-compat` inferlet's input, with the checks that need
the model: prompt tokens, the context length, token ids in the vocabulary, forced tool-call grammars.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from inferlet._host import HostError
from pie.engine.vision import audio_families, image_families
from pie.errors import PieError, RequestError
from pie.server.api.harmony import HarmonyUnavailable, stop_tokens
from pie.server.api.images import MediaPart
from pie.server.api.served import ServedModel
from pie.server.openai_schema import MAX_TOKENS_DEFAULT, GenerationRequest, OpenAIError


@dataclass(frozen=True)
class Plan:
    request: GenerationRequest
    model: ServedModel
    prompts: tuple[tuple[int, ...], ...]
    max_tokens: int
    constraint: dict[str, Any] | None
    parse_tools: bool  # read tool calls back out of the text
    save: str | None = None
    images: tuple[tuple[int, MediaPart], ...] = ()  # (row of the first token in prompt 0, the image or clip)

    def inferlet_input(self) -> str:
        req = self.request
        return json.dumps({
            "images": [[row, base64.b64encode(part.data).decode(), part.kind] for row, part in self.images],
            "model": req.model, "prompts": [list(p) for p in self.prompts], "n": req.n,
            "max_tokens": self.max_tokens,
            "sampler": {"temperature": req.sampling.temperature, "top_p": req.sampling.top_p,
                        "top_k": req.sampling.top_k, "min_p": req.sampling.min_p,
                        "presence_penalty": req.sampling.presence_penalty,
                        "frequency_penalty": req.sampling.frequency_penalty,
                        "repetition_penalty": req.sampling.repetition_penalty,
                        "logit_bias": [list(pair) for pair in req.sampling.logit_bias]},
            "seed": req.seed, "stop": list(req.stop), "stop_token_ids": self._stop_token_ids(),
            "ignore_eos": req.ignore_eos, "min_tokens": req.min_tokens, "logprobs": req.logprobs,
            "constraint": self.constraint, "render_special": self.parse_tools or self.model.reasoning,
            "stream": True, "save": self.save,  # always: the server times every step (metrics)
            "prompt_logprobs": req.logprobs if req.echo else None,
            # harmony: the server parses the channels from the token ids, the inferlet decodes nothing
            "tokens": self.harmony, "text": not self.harmony,
        })

    @property
    def harmony(self) -> bool:
        return self.model.harmony and self.request.mode == "chat"

    def _stop_token_ids(self) -> list[int]:
        given = list(self.request.stop_token_ids)
        return sorted(set(given) | set(stop_tokens())) if self.harmony else given

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def build_plan(req: GenerationRequest, model: ServedModel, *, save: str | None = None) -> Plan:
    if model.harmony:
        _check_harmony(req)
    elif req.reasoning_effort is not None:
        raise OpenAIError(f"`reasoning_effort` is not supported: {model.name!r} takes no reasoning effort (only "
                          "harmony models, GPT-OSS, do); leave it out", param="reasoning_effort",
                          code="unsupported_parameter")
    try:
        prompts, images = _prompt_tokens(req, model)
    except RequestError as error:
        if isinstance(error, OpenAIError):
            raise
        if isinstance(error, HarmonyUnavailable):
            raise OpenAIError(str(error), status=503, kind="server_error") from None
        raise OpenAIError(str(error), param="messages" if req.mode == "chat" else "prompt") from None
    max_tokens = _max_tokens(req, model, prompts)
    bad = [t for t in req.stop_token_ids if model.vocab_size and t >= model.vocab_size]
    if bad:
        raise OpenAIError(f"`stop_token_ids` has {bad[0]}, outside the vocabulary [0, {model.vocab_size})",
                          param="stop_token_ids")
    biased = [t for t, _ in req.sampling.logit_bias if model.vocab_size and t >= model.vocab_size]
    if biased:
        raise OpenAIError(f"`logit_bias` has token {biased[0]}, outside the vocabulary [0, {model.vocab_size})",
                          param="logit_bias")
    if req.min_tokens > max_tokens:
        raise OpenAIError(f"`min_tokens` is {req.min_tokens}, more than the {max_tokens} tokens to generate",
                          param="min_tokens")
    tools = req.tools
    constraint: dict[str, Any] | None = None
    if req.json_schema is not None:
        constraint = {"json_schema": req.json_schema}
    if tools is not None and tools.forced:
        if constraint is not None:
            raise OpenAIError("`response_format` and a forced `tool_choice` both constrain the output; send one",
                              param="response_format")
        grammar = model.tool_format.grammar(tools.allowed(), tools.parallel, model.special_token_id)
        constraint = {"lark": grammar}
    if constraint is not None and req.ignore_eos:
        raise OpenAIError("`ignore_eos` cannot be combined with a constrained output (response_format or a "
                          "forced tool_choice ends at end-of-sequence)", param="ignore_eos")
    parse = tools is not None and tools.choice != "none"
    return Plan(req, model, prompts, max_tokens, constraint, parse, save, images)


def _check_harmony(req: GenerationRequest) -> None:
    """What harmony (GPT-OSS) plans cannot do yet: each a 400 naming the parameter."""
    if req.mode != "chat":
        return  # completions are raw tokens in, raw text out: no channels to parse
    if req.stop:
        raise OpenAIError("`stop` strings are not supported on a harmony (GPT-OSS) model: its output is "
                          "channels of special tokens; send `stop_token_ids`", param="stop")
    if req.json_schema is not None:
        raise OpenAIError("`response_format` is not supported on a harmony (GPT-OSS) model yet: the schema "
                          "would have to constrain the final channel only", param="response_format")
    if req.tools is not None and req.tools.forced:
        raise OpenAIError("a forced `tool_choice` (required or a named function) is not supported on a harmony "
                          "(GPT-OSS) model yet; use 'auto'", param="tool_choice")


def _prompt_tokens(req: GenerationRequest, model: ServedModel
                   ) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, MediaPart], ...]]:
    if req.mode == "chat":
        declared = list(req.tools.declared) if req.tools is not None else None
        if not req.images:
            return (tuple(model.render_chat(list(req.messages), declared, reasoning_effort=req.reasoning_effort)),), ()
        if model.harmony:
            raise OpenAIError("images are not supported on a harmony (GPT-OSS) model", param="messages")
        tokens, rows = model.render_chat_images(list(req.messages), declared, _prepare(req, model))
        return (tuple(tokens),), tuple(zip(rows, req.images, strict=True))
    prompts: list[tuple[int, ...]] = []
    for i, prompt in enumerate(req.prompts):
        ids = tuple(model.encode(prompt)) if isinstance(prompt, str) else prompt
        if not ids:
            raise OpenAIError(f"prompt {i} is empty: give at least one token", param="prompt")
        bad = [t for t in ids if model.vocab_size and t >= model.vocab_size]
        if bad:
            raise OpenAIError(f"prompt {i} has token id {bad[0]}, outside the vocabulary [0, {model.vocab_size})",
                              param="prompt")
        prompts.append(ids)
    return tuple(prompts), ()


def _prepare(req: GenerationRequest, model: ServedModel) -> list[Any]:
    """Each image and audio clip decoded and prepared on the model's engines (a 400 naming the part and
    saying why when one cannot be)."""
    image = next((part for part in req.images if part.kind == "image"), None)
    audio = next((part for part in req.images if part.kind == "audio"), None)
    if model.prepare_image is None and image is not None:
        raise OpenAIError(f"{image.param}: model {model.name!r} serves text only and takes no images (pie runs the "
                          f"vision tower of {', '.join(image_families())} checkpoints); send text only",
                          param=image.param, code="image_input_not_supported")
    if model.prepare_audio is None and audio is not None:
        raise OpenAIError(f"{audio.param}: model {model.name!r} takes no audio (pie runs the audio tower of "
                          f"{', '.join(audio_families())} checkpoints with an audio_config); send no input_audio "
                          "parts", param=audio.param, code="audio_input_not_supported")
    out = []
    for part in req.images:
        prepare = model.prepare_audio if part.kind == "audio" else model.prepare_image
        assert prepare is not None
        try:
            out.append(prepare(part.data))
        except (PieError, HostError) as error:
            raise OpenAIError(f"{part.param}: {error}", param=part.param,
                              code="invalid_audio" if part.kind == "audio" else "invalid_image") from None
    rows = sum(len(info.embed_rows) for info in out)
    if model.max_num_embeds and rows > model.max_num_embeds:
        raise OpenAIError(f"the messages' {len(out)} image(s) take {rows} embedding rows, over the model's "
                          f"max_num_embeds = {model.max_num_embeds} (one prefill); send fewer images, or raise "
                          "max_num_embeds in the model's config", param="messages", code="too_many_images")
    return out


def _max_tokens(req: GenerationRequest, model: ServedModel, prompts: tuple[tuple[int, ...], ...]) -> int:
    """The completion budget; a prompt plus it beyond the context is a 400 with the numbers."""
    limit = model.max_model_len
    longest = max(len(p) for p in prompts)
    if not limit:
        return req.max_tokens or MAX_TOKENS_DEFAULT
    left = limit - longest
    if req.max_tokens is None:
        if left < 1:
            raise OpenAIError(f"This model's maximum context length is {limit} tokens. However, your prompt is "
                              f"{longest} tokens, which leaves no room for a completion. Please reduce the length "
                              "of the messages or prompt.", param="messages" if req.mode == "chat" else "prompt",
                              code="context_length_exceeded")
        return min(MAX_TOKENS_DEFAULT, left)
    if longest + req.max_tokens > limit:
        where = "messages" if req.mode == "chat" else "prompt"
        raise OpenAIError(f"This model's maximum context length is {limit} tokens. However, you requested "
                          f"{longest + req.max_tokens} tokens ({longest} in the {where}, {req.max_tokens} in the "
                          f"completion). Please reduce the length of the {where} or `{req.max_tokens_param}`.",
                          param=where if longest >= limit else req.max_tokens_param,
                          code="context_length_exceeded")
    return req.max_tokens
