"""Images and audio clips in HTTP requests: `data:` URLs and base64 blocks -> bytes, marked in the message text.

An image part of a message becomes a marker in the message's text (`marker(i)`,
image `i` of the request), so the conversation still renders through the
model's chat template as text; `render_chat` then splits the rendered prompt at
the markers and puts each image's placeholder tokens there. Remote URLs are
refused: pie fetches nothing from the network. An OpenAI `input_audio` part
(base64 WAV) takes the same path as an `AudioClip`: the request's one list of
media keeps the order of the markers, and the kind rides with the bytes. Every
problem is a 400 that says what and the fix.
"""

from __future__ import annotations

import base64
import binascii
import re

from pie.server.openai_schema import OpenAIError

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # one encoded image, as OpenAI caps an image input
MAX_IMAGES = 32  # per request
_MARK = "\u2063PIE-IMAGE-"
_MARKERS = re.compile("\u2063PIE-IMAGE-(\\d+)\u2063")
_DATA_URL = re.compile(r"^data:(image/[A-Za-z0-9.+-]+)?(;[^,;]*)*;base64,", re.IGNORECASE)


class AudioClip(bytes):
    """The WAV bytes of an `input_audio` part, in the request's list beside the images' bytes."""


def audio_part(spec: object, param: str) -> AudioClip:
    """An `input_audio` object ({data: base64, format: "wav"}) -> its bytes."""
    if not isinstance(spec, dict):
        raise OpenAIError(f"{param} must be an object {{data, format}}", param=param)
    fmt = spec.get("format")
    if fmt != "wav":
        raise OpenAIError(f"{param}.format is {fmt!r}: pie decodes WAV audio only; send format \"wav\"",
                          param=f"{param}.format", code="unsupported_audio_format")
    return AudioClip(decode_base64(spec.get("data"), f"{param}.data", "audio clip"))


def marker(i: int) -> str:
    return f"{_MARK}{i}\u2063"


def split_markers(text: str) -> list[str | int]:
    """Rendered text -> text pieces and image indices, in order."""
    out: list[str | int] = []
    for k, piece in enumerate(_MARKERS.split(text)):
        out.append(int(piece) if k % 2 else piece)
    return out


def check_text(text: str, param: str) -> str:
    if _MARK in text:
        raise OpenAIError(f"{param} contains pie's image marker text (U+2063 'PIE-IMAGE-'); remove it",
                          param=param)
    return text


def decode_base64(data: object, param: str, what: str = "image") -> bytes:
    if not isinstance(data, str):
        raise OpenAIError(f"{param}: {what} data must be a base64 string", param=param)
    if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise OpenAIError(f"{param}: the {what} is over {MAX_IMAGE_BYTES} bytes; send a smaller {what}", param=param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise OpenAIError(f"{param}: the {what} is not valid base64 ({e})", param=param) from None
    if not raw:
        raise OpenAIError(f"{param}: the {what} is empty", param=param)
    return raw


def data_url_bytes(url: object, param: str) -> bytes:
    """An `image_url.url`: a `data:image/...;base64,...` URL -> its bytes (remote URLs are a 400)."""
    if not isinstance(url, str) or not url:
        raise OpenAIError(f"{param} must be a data: URL string", param=param)
    match = _DATA_URL.match(url)
    if match is None:
        if url.startswith(("http://", "https://")):
            raise OpenAIError(f"{param}: remote image URLs are not fetched (pie reaches no network from a request); "
                              "send the image inline as a data:image/...;base64,... URL", param=param,
                              code="unsupported_image_url")
        raise OpenAIError(f"{param}: not a base64 data URL; send data:image/png;base64,... (or jpeg, webp, gif)",
                          param=param)
    return decode_base64(url[match.end():], param)
