"""Images in contexts: preparing them on a model's engines, their places in a context's record, and the
per-instance limits.

An image enters a context as its placeholder tokens (`ImageInfo.tokens`) plus an
`ImagePlacement` naming the image by content hash at the slot of its first
token. The placement rides with every request that covers those slots (first
prefill, chunks, recomputation after a suspension), and the content key of
every page it overlaps includes the image's hash, so the same image at the same
place after the same prefix shares its KV pages through the prefix trie, and two
different images with equal placeholder tokens never do. For towers whose image
rows attend to each other both ways (Gemma 3) a pass's chunks never end inside
an image's embedding rows (`chunk_end`). An image with M-RoPE (Qwen3-VL, Qwen
3.5) takes fewer positions than tokens (`ImageInfo.position_span`), so a
context's next position is its kv_len less what its images saved
(`position_shift`), and a pass is at its expected positions when they follow
`inferlet.image.row_positions`.

Audio clips (`MediaKind.AUDIO`, Gemma 4) are the same kind of thing here: an `ImageInfo` whose embedding
rows take the audio tower's outputs, placed, keyed and shared exactly as images are; `prepare_media`
picks the engine's preparer by kind and `InstanceImages` counts clips with the images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from inferlet._host import HostError
from inferlet.image import row_positions
from pie.engine.vision.info import MediaKind
from pie.errors import PieError

if TYPE_CHECKING:
    from pie.engine.vision.info import ImageInfo
    from pie.runtime.model_runtime import ModelRuntime


class ImagePlacement(NamedTuple):
    slot: int  # the context slot of the image's first token
    key: str  # the content hash the engines hold it under
    length: int  # its tokens
    rows: tuple[int, int]  # slots [a, b) from its first to its last embedding row
    bidirectional: bool  # those rows attend to each other both ways
    offsets: tuple[int, ...]  # each token's position relative to the first's (`ImageInfo.position_offsets`)
    span: int  # positions it advances the context by (`ImageInfo.position_span`)

    @property
    def block(self) -> tuple[int, int] | None:
        return self.rows if self.bidirectional else None


def placement(info: ImageInfo, slot: int) -> ImagePlacement:
    rows = info.embed_rows or [0]
    return ImagePlacement(slot, info.key, len(info.tokens), (slot + rows[0], slot + rows[-1] + 1),
                          info.bidirectional, tuple(info.position_offsets), info.position_span)


def position_shift(images: Sequence[ImagePlacement]) -> int:
    """How many positions fewer than slots `images` take: kv_len - this is a context's next position."""
    return sum(p.length - p.span for p in images)


def expected_positions(first: int, num_rows: int, images: Sequence[ImagePlacement], kv_start: int) -> list[int]:
    """The positions a pass of `num_rows` rows at slots [kv_start, ...) takes from position `first` when it
    follows the images it places (`inferlet.image.row_positions`)."""
    return row_positions(first, num_rows, ((p.slot - kv_start, p.offsets, p.span) for p in images))


def overlapping(images: Sequence[ImagePlacement], start: int, end: int) -> list[ImagePlacement]:
    return [p for p in images if p.slot < end and p.slot + p.length > start]


def page_extra(images: Sequence[ImagePlacement], start: int, end: int) -> bytes:
    """What a page's content key adds for slots [start, end): the offset and hash of each image whose
    embedding rows reach into it (its other placeholder rows are tokens like any other)."""
    return b"".join(f"{p.slot - start}:{p.key};".encode() for p in images
                    if p.rows[0] < end and p.rows[1] > start)


def chunk_end(images: Sequence[ImagePlacement], start: int, end: int) -> int:
    """`end` moved so that [start, end) does not end inside a both-ways image block: back to the block's
    start when the chunk begins before it, else on to its end."""
    for p in images:
        if p.block is not None and p.block[0] < end < p.block[1]:
            return p.block[0] if p.block[0] > start else p.block[1]
    return end


def prepare_image(model: ModelRuntime, data: bytes, max_pixels: int) -> ImageInfo:
    return prepare_media(model, data, MediaKind.IMAGE, max_pixels)


def prepare_media(model: ModelRuntime, data: bytes, kind: MediaKind, limit: float) -> ImageInfo:
    """Prepare `data` (an image within `limit` pixels, or an audio clip within `limit` seconds) on every
    engine group of `model` (a context's group must hold its images and clips)."""
    info: ImageInfo | None = None
    for group in model.groups:
        prepare = getattr(group.engine, f"prepare_{kind.value}", None)
        if prepare is None:
            raise HostError(f"model {model.name!r} takes no {kind.value} here: its engine "
                            f"({type(group.engine).__name__}) has no {kind.value} tower (tensor-parallel workers "
                            "do not run one yet)")
        try:
            info = prepare(data, limit)
        except PieError as e:
            raise HostError(str(e)) from None
    assert info is not None
    return info


class InstanceImages:
    """The images and audio clips one instance prepared (only those it may place), within its count limit
    and the pixel / seconds limit of one."""

    def __init__(self, max_images: int, max_pixels: int, max_audio_seconds: float = 0.0) -> None:
        self.max_images = max_images
        self.limits = {MediaKind.IMAGE: float(max_pixels), MediaKind.AUDIO: float(max_audio_seconds)}
        self._held: dict[str, ImageInfo] = {}

    @property
    def max_pixels(self) -> int:
        return int(self.limits[MediaKind.IMAGE])

    def add(self, model: ModelRuntime, data: Any, kind: MediaKind = MediaKind.IMAGE) -> ImageInfo:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            what = "an image must be bytes (PNG, JPEG, WebP, GIF)" if kind is MediaKind.IMAGE else \
                "an audio clip must be bytes (WAV)"
            raise HostError(f"{what}, got {type(data).__name__}")
        held = self._held.get(hashlib.sha256(data).hexdigest())
        if held is not None and held.kind is kind:  # the same bytes again: the same image, counted once
            return held
        if self.max_images and len(self._held) >= self.max_images:
            raise HostError(f"this instance prepared {len(self._held)} images and audio clips, its limit "
                            "([runtime] max_images_per_instance); reuse prepared ones, or raise the limit")
        limit = self.limits[kind]
        info = prepare_media(model, bytes(data), kind, int(limit) if kind is MediaKind.IMAGE else limit)
        if len(info.tokens) > model.max_batch_tokens:
            raise HostError(f"the {kind.value} takes {len(info.tokens)} tokens, over max_batch_tokens = "
                            f"{model.max_batch_tokens} (it is computed in one pass); raise max_batch_tokens")
        self._held[info.key] = info
        return info

    def get(self, key: Any) -> ImageInfo:
        info = self._held.get(key) if isinstance(key, str) else None
        if info is None:
            raise HostError(f"image or audio clip {key!r} was not prepared by this instance; make it with "
                            "Image.from_bytes or Audio.from_bytes")
        return info


def pass_images(spec_images: Any, tokens: Sequence[int], kv_len: int, held: InstanceImages,
                max_num_embeds: int) -> list[ImagePlacement]:
    """A pass's `images` ([[key, row], ...]) checked against its tokens; their placements in the context."""
    if not spec_images:
        return []
    if not isinstance(spec_images, list):
        raise HostError("images must be a list of [image key, row] pairs")
    out: list[ImagePlacement] = []
    embeds = 0
    end = -1
    for item in spec_images:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and type(item[1]) is int):
            raise HostError(f"images: each entry is [image key, row], got {item!r}")
        info = held.get(item[0])
        row, n = item[1], len(info.tokens)
        if row < 0 or row + n > len(tokens):
            raise HostError(f"image at row {row} needs rows [{row}, {row + n}) but the pass has {len(tokens)} rows")
        if row < end:
            raise HostError(f"images overlap or are out of order: one at row {row} starts before the one before "
                            f"it ends (row {end}); give them in row order")
        if list(tokens[row:row + n]) != info.tokens:
            raise HostError(f"rows [{row}, {row + n}) do not hold the image's {n} placeholder tokens; pass the "
                            "tokens Image.token_ids gives")
        end = row + n
        embeds += len(info.embed_rows)
        out.append(placement(info, kv_len + row))
    if embeds > max_num_embeds:
        raise HostError(f"the pass places {embeds} image embedding rows, over max_num_embeds = {max_num_embeds}; "
                        "send fewer images per pass or raise max_num_embeds")
    return out
