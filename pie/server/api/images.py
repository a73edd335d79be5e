"""Images and audio clips in HTTP requests: `data:` URLs and base64 blocks -> bytes, marked in the message text.

An image part of a message becomes a marker in the message's text (`marker(i)`,
image `i` of the request), so the conversation still renders through the
model's chat template as text; `render_chat` then splits the rendered prompt at
the markers and puts each image's placeholder tokens there. Parsing yields a
`MediaPart` per image or audio clip (its bytes, or for images a remote URL still
to fetch), in the order of the markers, the kind riding with the bytes;
`fetch_images` then fetches remote URLs that `[server] allowed_image_urls`
permits (each redirect hop checked too), within `max_image_bytes` and
`image_fetch_timeout_s`. An OpenAI `input_audio` part (base64 WAV) is a part of
kind "audio". Every problem is a 400 that names the part and says what and the fix.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from pie.server.openai_schema import OpenAIError

if TYPE_CHECKING:
    from pie.server.api.served import ServedModel
    from pie.server.openai_schema import GenerationRequest
    from pie.server.options import ServerOptions

MAX_IMAGES = 32  # per request
_MARK = "\u2063PIE-IMAGE-"
_MARKERS = re.compile("\u2063PIE-IMAGE-(\\d+)\u2063")
_DATA_URL = re.compile(r"^data:(image/[A-Za-z0-9.+-]+)?(;[^,;]*)*;base64,", re.IGNORECASE)


MAX_REDIRECTS = 5


@dataclass(frozen=True)
class MediaPart:
    """One image or audio clip of a request: `param` names it in errors; `url` is a remote image URL still to
    fetch; `kind` is "image" or "audio" (WAV bytes)."""

    param: str
    data: bytes = b""
    url: str | None = None
    kind: str = "image"


def audio_part(spec: object, param: str) -> MediaPart:
    """An `input_audio` object ({data: base64, format: "wav"}) -> its part."""
    if not isinstance(spec, dict):
        raise OpenAIError(f"{param} must be an object {{data, format}}", param=param)
    fmt = spec.get("format")
    if fmt != "wav":
        raise OpenAIError(f"{param}.format is {fmt!r}: pie decodes WAV audio only; send format \"wav\"",
                          param=f"{param}.format", code="unsupported_audio_format")
    return MediaPart(param, decode_base64(spec.get("data"), f"{param}.data", "audio clip"), kind="audio")


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
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise OpenAIError(f"{param}: the {what} is not valid base64 ({e})", param=param) from None
    if not raw:
        raise OpenAIError(f"{param}: the {what} is empty", param=param)
    return raw


def image_url_part(url: object, param: str) -> MediaPart:
    """An image URL: `data:image/...;base64,...` -> its bytes; http(s) -> a part to fetch (`fetch_images`)."""
    if not isinstance(url, str) or not url:
        raise OpenAIError(f"{param} must be a data: URL or http(s) URL string", param=param)
    match = _DATA_URL.match(url)
    if match is None:
        if url.startswith(("http://", "https://")):
            return MediaPart(param, url=url)
        raise OpenAIError(f"{param}: not a base64 data URL or http(s) URL; send data:image/png;base64,... "
                          "(or jpeg, webp, gif)", param=param)
    return MediaPart(param, decode_base64(url[match.end():], param))


async def fetch_images(req: GenerationRequest, model: ServedModel, options: ServerOptions) -> GenerationRequest:
    """`req` with each remote image fetched and every part (images and audio clips) checked against
    `max_image_bytes` (a text-only model refuses images before anything is fetched)."""
    if not req.images:
        return req
    image = next((part for part in req.images if part.kind == "image"), None)
    if model.prepare_image is None and image is not None:
        raise OpenAIError(f"{image.param}: model {model.name!r} serves text only and takes no images; send text "
                          "only", param=image.param, code="image_input_not_supported")
    parts = []
    for part in req.images:
        if part.url is not None:
            part = MediaPart(part.param, await _fetch(part, options))
        what = "audio clip" if part.kind == "audio" else "image"
        if len(part.data) > options.max_image_bytes:
            raise OpenAIError(f"{part.param}: the {what} is {len(part.data)} bytes, over [server] max_image_bytes "
                              f"= {options.max_image_bytes}; send a smaller {what}", param=part.param,
                              code="image_too_large")
        parts.append(part)
    return dataclasses.replace(req, images=tuple(parts))


def _allowed(url: str, options: ServerOptions) -> bool:
    return url.startswith(("http://", "https://")) and any(url.startswith(p) for p in options.allowed_image_urls)


async def _fetch(part: MediaPart, options: ServerOptions) -> bytes:
    """GET an allowed image URL, following only redirects to allowed URLs, the byte cap enforced while reading."""
    assert part.url is not None
    where = part.param
    url = part.url
    if not _allowed(url, options):
        why = ("no remote image URLs are allowed" if not options.allowed_image_urls
               else "the URL matches no prefix of [server] allowed_image_urls")
        raise OpenAIError(f"{where}: {why}; add its prefix to [server] allowed_image_urls in config.toml, or "
                          "send the image inline as a data:image/...;base64,... URL", param=where,
                          code="unsupported_image_url")
    try:
        async with asyncio.timeout(options.image_fetch_timeout_s), \
                httpx.AsyncClient(follow_redirects=False, trust_env=False) as http:
            for _ in range(MAX_REDIRECTS + 1):
                async with http.stream("GET", url) as response:
                    if response.is_redirect:
                        target = str(response.url.join(response.headers.get("location", "")))
                        if not _allowed(target, options):
                            raise OpenAIError(f"{where}: {url} redirects to {target}, which [server] "
                                              "allowed_image_urls does not permit", param=where,
                                              code="image_fetch_failed")
                        url = target
                        continue
                    return await _read(response, where, options.max_image_bytes)
            raise OpenAIError(f"{where}: more than {MAX_REDIRECTS} redirects", param=where, code="image_fetch_failed")
    except TimeoutError:
        raise OpenAIError(f"{where}: fetching the image took over [server] image_fetch_timeout_s = "
                          f"{options.image_fetch_timeout_s} s", param=where, code="image_fetch_failed") from None
    except httpx.HTTPError as error:
        raise OpenAIError(f"{where}: fetching the image failed ({type(error).__name__}: {error})", param=where,
                          code="image_fetch_failed") from None


async def _read(response: httpx.Response, where: str, max_bytes: int) -> bytes:
    if response.status_code != 200:
        raise OpenAIError(f"{where}: fetching the image answered HTTP {response.status_code}", param=where,
                          code="image_fetch_failed")
    kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if not kind.startswith("image/"):
        raise OpenAIError(f"{where}: the URL serves {kind or 'no content type'!r}, not an image", param=where,
                          code="image_fetch_failed")
    data = bytearray()
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) > max_bytes:
            raise OpenAIError(f"{where}: the image is over [server] max_image_bytes = {max_bytes}; send a smaller "
                              "image", param=where, code="image_too_large")
    if not data:
        raise OpenAIError(f"{where}: the image is empty", param=where, code="image_fetch_failed")
    return bytes(data)
