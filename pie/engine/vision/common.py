"""What every vision family's image processor hands its tower: one prepared image."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PreparedImage:
    pixel_values: torch.Tensor     # exactly what the tower takes for this image
    grid: tuple[int, int, int]     # (t, h, w) in patches after the processor (t=1 for images)
    tokens: list[int]              # the token ids the image occupies in the prompt, incl. begin/end/break tokens
    embed_rows: list[int]          # indices into `tokens` whose rows take embeddings (the others are embedded as tokens)
    positions: torch.Tensor | None # M-RoPE (3, len(tokens)) position offsets relative to the image start, or None
