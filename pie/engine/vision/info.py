"""What the runtime learns about an image or audio clip the engine prepared: plain data, torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class MediaKind(StrEnum):
    """What a prepared input is: each kind has its own processor and tower (`vision/encoder.py`); both
    enter prompts the same way, as placeholder tokens whose embedding rows take the tower's outputs."""

    IMAGE = "image"
    AUDIO = "audio"


@dataclass(frozen=True)
class ImageInfo:
    """An image (or, `kind` audio, a clip) the engine holds, prepared, under `key` (the hex SHA-256 of its
    encoded bytes).

    tokens: the token ids the image occupies in a prompt (placeholders included); a request places the
      image by naming the row of `tokens[0]` (`Request.images`, which places audio clips too).
    embed_rows: the indices into `tokens` whose rows take the tower's embeddings.
    grid: (t, h, w) in patches; positions: M-RoPE offsets (3 rows of len(tokens)) or None.
    bidirectional: the embedding rows attend to each other both ways, so the image must lie whole inside
      one forward pass (Gemma 3).
    width, height: of the decoded image, before resizing (0 for audio).
    text_around: text the family's processor puts before and after the tokens in a prompt (Gemma 3: a
      blank line each side); chat rendering adds it to the neighbouring text.
    kind: image or audio; seconds: an audio clip's duration (0 for images).
    """

    key: str
    tokens: list[int]
    embed_rows: list[int]
    grid: tuple[int, int, int]
    positions: list[list[int]] | None
    bidirectional: bool
    width: int
    height: int
    text_around: tuple[str, str] = ("", "")
    kind: MediaKind = MediaKind.IMAGE
    seconds: float = 0.0

    @property
    def position_span(self) -> int:
        """How many positions the image advances the prompt by (its token count without M-RoPE)."""
        return image_position_span(self.positions, len(self.tokens))

    @property
    def position_offsets(self) -> list[int]:
        """The 1-D position of each token relative to the first's: see `image_position_offsets`."""
        return image_position_offsets(self.positions, len(self.tokens))


def image_position_span(positions: list[list[int]] | None, num_tokens: int) -> int:
    return num_tokens if positions is None else max(max(row) for row in positions) + 1


def image_position_offsets(positions: list[list[int]] | None, num_tokens: int) -> list[int]:
    """The 1-D positions an image's tokens take, from its first token's: 0, 1, ... without M-RoPE; with it,
    the temporal row of the (t, h, w) offsets (Qwen3-VL: 0, then 1 for every pad, then span - 1), so the
    1-D positions never decrease, the last is start + span - 1, and any row gives back the image's start
    (the engine adds the h and w offsets from there)."""
    return list(range(num_tokens)) if positions is None else list(positions[0])
