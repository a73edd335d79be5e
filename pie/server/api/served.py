"""What the HTTP APIs need to know about a served model: its context length, its tokenizer, and how
its chat template renders a whole conversation (tools, tool calls and tool results included).

Prompts are rendered here, in the server, as Hugging Face's `apply_chat_template` renders them (the
template gets `messages`, `tools` and `add_generation_prompt`), then tokenized once; the inferlet
receives token ids. That is what makes the context-length check exact before any generation starts,
and lets assistant `tool_calls` and `role: "tool"` messages go through the model's own template.

Templates that know no tools get pie's convention instead (`pie.runtime.tokenizer.TOOL_CONVENTION`:
a system message listing the tools, calls in `<tool_call>` tags); templates that cannot render an
assistant's `tool_calls` get the calls as text in the model's format, and results of a template
without a tool role come back as a user turn in `<tool_response>` tags.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pie.errors import ChatTemplateError, ModelNotFoundError, RequestError
from pie.runtime.tokenizer import TOOL_CALL_TAGS, TOOL_CONVENTION, ModelTokenizer
from pie.server.api import harmony
from pie.server.api.images import split_markers
from pie.server.api.tool_parsers import ToolCall, ToolFormat, detect_format

if TYPE_CHECKING:
    from pie.engine.vision.info import ImageInfo

_PROBE_TOOL = {"type": "function", "function": {"name": "pie_probe_fn", "description": "probe",
                                                "parameters": {"type": "object", "properties": {}}}}
_PROBE_CALL = {"id": "call_probe", "type": "function", "function": {"name": "pie_probe_fn", "arguments": {}}}
_MARKER = "\u2063PIE-TOOL-RESULT\u2063"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@runtime_checkable
class _ModelRuntime(Protocol):
    name: str

    @property
    def tokenizer(self) -> ModelTokenizer: ...

    def describe(self) -> dict[str, Any]: ...


@runtime_checkable
class _HasModels(Protocol):
    def model(self, name: str = "") -> _ModelRuntime: ...


class ServedModel:
    """One model as the HTTP APIs see it. Built once per model and runtime (`served_model`)."""

    def __init__(self, name: str, model_dir: Path | None, tokenizer: ModelTokenizer | None,
                 facts: dict[str, Any], prepare_image: Callable[[bytes], ImageInfo] | None = None,
                 prepare_audio: Callable[[bytes], ImageInfo] | None = None) -> None:
        self.name = name
        # Decode + preprocess an image on the model's engines (None: the model takes no images).
        self.prepare_image = prepare_image
        self.prepare_audio = prepare_audio  # the same for a WAV clip (None: the model takes no audio)
        self.max_num_embeds = int(facts.get("max_num_embeds") or 0)  # image embedding rows per pass
        self.tokenizer = tokenizer
        self.vocab_size = int(facts.get("vocab_size") or (tokenizer.vocab_size if tokenizer else 0))
        # One request's context lives on one group, within one instance's page limit.
        pages = int(facts.get("max_pages_per_instance") or facts.get("num_pages", 0))
        pool_tokens = pages * int(facts.get("page_size", 0))
        positions = _max_positions(model_dir)
        limits = [n for n in (positions, pool_tokens) if n > 0]
        self.max_model_len = min(limits) if limits else 0
        template = tokenizer.template if tokenizer else None
        self.template_source = template.source if template else None
        self.tool_format: ToolFormat = detect_format(self.template_source)
        # GPT-OSS speaks harmony: prompts and outputs go through openai-harmony, not the template.
        self.harmony = _model_type(model_dir) == "gpt_oss"

    # -- facts ---------------------------------------------------------------------------------

    @property
    def reasoning(self) -> bool:
        """Whether the template knows `<think>` blocks (Qwen3, DeepSeek-R1): split them into reasoning."""
        return bool(self.template_source and THINK_CLOSE in self.template_source)

    @cached_property
    def thinks_from_start(self) -> bool:
        """Whether the generation prompt itself opens the `<think>` block (the output starts inside it)."""
        if not self.reasoning or self._template is None:
            return False
        anchor = [{"role": "user", "content": "A"}]
        cue = self._template.render(anchor, add_generation_prompt=True)[len(self._template.render(anchor)):]
        return cue.rstrip().endswith(THINK_OPEN)

    @property
    def _template(self) -> Any:
        return self.tokenizer.template if self.tokenizer else None

    def _tok(self) -> ModelTokenizer:
        if self.tokenizer is None:
            raise RequestError(f"model {self.name!r} has no tokenizer (tokenizer.json), so it cannot serve "
                               "text requests; send token ids to /v1/completions, or serve a checkpoint with one")
        return self.tokenizer

    # -- tokens --------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self._tok().encode(text)

    def decode(self, tokens: list[int]) -> str:
        return self._tok().decode(tokens)

    def token_bytes(self, token: int) -> bytes:
        pieces = self._tok().vocabs()[1]
        return pieces[token] if 0 <= token < len(pieces) else b""

    def special_token_id(self, text: str) -> int | None:
        ids = self._tok().encode(text)
        return ids[0] if len(ids) == 1 else None

    # -- chat ----------------------------------------------------------------------------------

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, *,
                    reasoning_effort: str | None = None) -> list[int]:
        """The prompt tokens of a conversation, ending with the generation prompt (`reasoning_effort`:
        harmony models only)."""
        if self.harmony:
            return harmony.render(messages, tools, reasoning_effort=reasoning_effort)
        return self._tok().encode(self._render_text(messages, tools))

    def render_chat_images(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                           images: list[ImageInfo]) -> tuple[list[int], list[int]]:
        """A conversation whose text marks `images` (`pie.server.api.images`): its tokens, with each image's
        placeholder tokens where its marker was, and the row of each image's first token."""
        tok = self._tok()
        tokens: list[int] = []
        rows: list[int | None] = [None] * len(images)
        pieces = split_markers(self._render_text(messages, tools))
        for k, piece in enumerate(pieces):  # an image's text_around joins the text beside it, as HF's processor
            if isinstance(piece, int) and piece < len(images):
                before, after = images[piece].text_around
                pieces[k - 1] = f"{pieces[k - 1]}{before}"  # markers always sit between two text pieces
                pieces[k + 1] = f"{after}{pieces[k + 1]}"
        for piece in pieces:
            if isinstance(piece, str):
                tokens += tok.encode(piece)
            elif piece < len(images) and rows[piece] is None:
                rows[piece] = len(tokens)
                tokens += images[piece].tokens
        if any(r is None for r in rows):
            raise RequestError("the model's chat template dropped an image of the messages (images are taken "
                               "in user messages only)")
        return tokens, [int(r) for r in rows if r is not None]

    def _render_text(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
        template = self._template
        if template is None:
            return self._plain(self._adapt(messages, tools))
        native = tools if tools and self._native_tools else None
        try:
            return template.render(self._adapt(messages, tools), add_generation_prompt=True, tools=native)
        except ChatTemplateError as error:
            raise RequestError(str(error)) from None

    def _adapt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        """The messages in the shapes this template renders (see the module docstring)."""
        out: list[dict[str, Any]] = []
        call_names: dict[str, str] = {}
        for message in messages:
            role = message["role"]
            if role == "assistant" and message.get("tool_calls"):
                calls = [ToolCall(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
                call_names.update({c["id"]: c["function"]["name"] for c in message["tool_calls"]})
                if self._native_tool_calls:
                    out.append({"role": "assistant", "content": message.get("content") or "",
                                "tool_calls": [_hf_call(c) for c in message["tool_calls"]]})
                else:
                    text = "\n".join(self.tool_format.call_text(c) for c in calls)
                    content = message.get("content") or ""
                    out.append({"role": "assistant", "content": f"{content}\n{text}" if content else text})
            elif role == "tool":
                name = message.get("name") or call_names.get(message.get("tool_call_id", ""), "")
                if self._native_tool_role:
                    out.append({"role": "tool", "content": message["content"], "name": name,
                                "tool_call_id": message.get("tool_call_id", "")})
                else:
                    wrapped = json.dumps({"name": name, "content": message["content"]}, ensure_ascii=False)
                    text = f"<tool_response>\n{wrapped}\n</tool_response>"
                    if out and out[-1].get("_tool_results"):
                        out[-1]["content"] += "\n" + text
                    else:
                        out.append({"role": "user", "content": text, "_tool_results": True})
            else:
                out.append({"role": role, "content": message.get("content") or ""})
        for message in out:
            message.pop("_tool_results", None)
        if tools and not self._native_tools:
            listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
            convention = TOOL_CONVENTION.format(start=TOOL_CALL_TAGS[0], end=TOOL_CALL_TAGS[1], tools=listing)
            if out and out[0]["role"] == "system":
                out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{convention}"}
            else:
                out.insert(0, {"role": "system", "content": convention})
        return out

    @staticmethod
    def _plain(messages: list[dict[str, Any]]) -> str:
        """A base model's conversation: each message's text and a blank line (pie's plain chat format)."""
        return "".join(f"{m['content']}\n\n" for m in messages)

    @cached_property
    def _native_tools(self) -> bool:
        return self._renders([{"role": "user", "content": "A"}], "pie_probe_fn", tools=[_PROBE_TOOL])

    @cached_property
    def _native_tool_calls(self) -> bool:
        conversation: list[dict[str, Any]] = [{"role": "user", "content": "A"},
                                              {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]}]
        return self._renders(conversation, "pie_probe_fn")

    @cached_property
    def _native_tool_role(self) -> bool:
        call: dict[str, Any] = ({"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]}
                                if self._native_tool_calls else {"role": "assistant", "content": "B"})
        conversation: list[dict[str, Any]] = [{"role": "user", "content": "A"}, call,
                        {"role": "tool", "content": _MARKER, "name": "pie_probe_fn", "tool_call_id": "call_probe"}]
        return self._renders(conversation, _MARKER)

    def _renders(self, messages: list[dict[str, Any]], needle: str, **kwargs: Any) -> bool:
        template = self._template
        if template is None:
            return False
        try:
            return needle in template.render(messages, **kwargs)
        except (ChatTemplateError, TypeError):
            return False


_CACHE: weakref.WeakKeyDictionary[object, dict[str, ServedModel]] = weakref.WeakKeyDictionary()


def served_model(runtime: object, name: str) -> ServedModel | None:
    """The model `name` of `runtime`, or None when the runtime does not expose its models."""
    per_runtime = _CACHE.setdefault(runtime, {})
    if name in per_runtime:
        return per_runtime[name]
    if not isinstance(runtime, _HasModels):
        return None
    model = runtime.model(name)
    try:
        tokenizer: ModelTokenizer | None = model.tokenizer
    except ModelNotFoundError:
        tokenizer = None
    info = getattr(model, "info", None)
    model_dir = Path(info.model_dir) if info is not None and getattr(info, "model_dir", None) else None
    served = per_runtime[name] = ServedModel(name, model_dir, tokenizer, model.describe(),
                                             _image_preparer(runtime, model), _audio_preparer(runtime, model))
    return served


def _model_type(model_dir: Path | None) -> str:
    if model_dir is None or not (model_dir / "config.json").is_file():
        return ""
    return str(json.loads((model_dir / "config.json").read_text()).get("model_type") or "")


def _image_preparer(runtime: object, model: object) -> Callable[[bytes], ImageInfo] | None:
    """`prepare_image` on the model's engines, within [runtime] max_image_pixels; None for text models."""
    from pie.engine.vision import serves_images
    from pie.runtime.images import prepare_image
    from pie.runtime.model_runtime import ModelRuntime

    if not isinstance(model, ModelRuntime) or not serves_images(str(model.info.model_type)):
        return None
    max_pixels = int(getattr(getattr(runtime, "limits", None), "max_image_pixels", 0) or 0)
    return lambda data: prepare_image(model, data, max_pixels)


def _audio_preparer(runtime: object, model: object) -> Callable[[bytes], ImageInfo] | None:
    """`prepare_audio` on the model's engines, within [runtime] max_audio_seconds; None for models without
    an audio tower pie runs."""
    from pie.engine.vision import serves_audio
    from pie.engine.vision.info import MediaKind
    from pie.runtime.images import prepare_media
    from pie.runtime.model_runtime import ModelRuntime

    if not isinstance(model, ModelRuntime) or not serves_audio(str(model.info.model_type)):
        return None
    config = Path(model.info.model_dir) / "config.json"
    if not config.is_file() or not json.loads(config.read_text()).get("audio_config"):
        return None  # a checkpoint of an audio family written without its audio tower
    seconds = float(getattr(getattr(runtime, "limits", None), "max_audio_seconds", 0.0) or 0.0)
    return lambda data: prepare_media(model, data, MediaKind.AUDIO, seconds)


def _max_positions(model_dir: Path | None) -> int:
    """`max_position_embeddings` (or a text config's) from the checkpoint's config.json; 0 if unknown."""
    if model_dir is None or not (model_dir / "config.json").is_file():
        return 0
    config = json.loads((model_dir / "config.json").read_text())
    for source in (config, config.get("text_config") or {}):
        value = source.get("max_position_embeddings") or source.get("max_sequence_length")
        if isinstance(value, int) and value > 0:
            return value
    return 0


def _hf_call(call: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI tool call as chat templates read it (arguments as an object, as transformers passes)."""
    arguments = call["function"]["arguments"]
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        parsed = arguments
    return {"id": call.get("id", ""), "type": "function",
            "function": {"name": call["function"]["name"], "arguments": parsed}}
