"""Images as model inputs (Pie 0.4's `Image`): prepared by the runtime, placed in a context like tokens.

    image = Image.from_bytes(model, png_bytes)
    ctx.user(["What is in this picture?", image])      # the chat template's image slot
    await ctx.append_image(image)                       # or into the KV cache now
    ctx.buffer_images([image])                          # or into the buffer, like `append`
    fwd.input_image(image)                              # or inside one forward pass

`from_bytes` decodes and preprocesses the bytes (PNG, JPEG, WebP, GIF) with the
checkpoint's own processor configuration; the same bytes are prepared once and,
placed after the same prefix, share their KV. `token_ids` are the placeholder
tokens the image occupies (`token_count` of them); `position_span` is how many
positions it advances the sequence by; `grid` is (t, h, w) in patches.

Positions: an image's tokens sit at its start + `position_offsets` (0, 1, 2, ...
for most families; Qwen3-VL and Qwen 3.5, whose M-RoPE gives an image
`position_span` positions for more tokens, put every pad at start + 1 and the
end token at start + span - 1), and the text after it goes on at start +
`position_span`. `Forward.input` / `input_image` and the context's
`next_position` follow this; a pass at other positions still runs, but its
pages are never shared.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from inferlet._host import get_host
from inferlet.model import Model


class Media:
    """What a context places alike for images and audio clips (`inferlet.audio.Audio`): a content key,
    placeholder tokens, the rows of them that take the tower's embeddings, and their positions."""

    __slots__ = ("embed_rows", "key", "model", "position_offsets", "position_span", "token_ids")

    def __init__(self, model: Model, info: dict[str, Any]) -> None:
        self.model = model
        self.key: str = info["key"]
        self.token_ids: list[int] = list(info["tokens"])
        self.embed_rows: list[int] = list(info["embed_rows"])
        self.position_span: int = int(info["position_span"])
        self.position_offsets: list[int] = list(info.get("position_offsets") or range(len(self.token_ids)))

    # The chat part that names it (`Host.chat_parts`).
    part_name = "image"

    @property
    def token_count(self) -> int:
        """Tokens the image occupies, its begin/end delimiters included (Pie counts those apart)."""
        return len(self.token_ids)

    @property
    def prefix_tokens(self) -> list[int]:
        """The delimiter tokens before its first embedding row (Gemma 3: <start_of_image>)."""
        return self.token_ids[:self.embed_rows[0]] if self.embed_rows else []

    @property
    def suffix_tokens(self) -> list[int]:
        """The delimiter tokens after its last embedding row (Gemma 3: <end_of_image>)."""
        return self.token_ids[self.embed_rows[-1] + 1:] if self.embed_rows else []


class Image(Media):
    __slots__ = ("grid", "height", "positions", "width")

    def __init__(self, model: Model, info: dict[str, Any]) -> None:
        super().__init__(model, info)
        self.grid: tuple[int, int, int] = tuple(info["grid"])
        self.positions: list[list[int]] | None = info.get("positions")
        self.width: int = int(info["width"])
        self.height: int = int(info["height"])

    @classmethod
    def from_bytes(cls, model: Model, data: bytes) -> Image:
        """Decode and prepare an encoded image for `model`; HostError if it cannot be decoded or is over
        the instance's limits (images, pixels)."""
        return cls(model, get_host().image_prepare(model.name, bytes(data)))

    def __repr__(self) -> str:
        return f"Image({self.key[:12]}, {self.width}x{self.height}, {self.token_count} tokens)"


def row_positions(start: int, num_rows: int, images: Iterable[tuple[int, Sequence[int], int]]) -> list[int]:
    """The positions of `num_rows` input rows from position `start`: text rows one apart, the rows of each
    image (row of its first token, its position offsets, its position span; in row order) at the image's
    start + its offsets, and the rows after it from its start + its span."""
    out: list[int] = []
    pos = start
    row = 0
    for first, offsets, span in images:
        out += range(pos, pos + first - row)
        pos += first - row
        out += (pos + o for o in offsets)
        pos, row = pos + span, first + len(offsets)
    out += range(pos, pos + num_rows - row)
    return out
