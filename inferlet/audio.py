"""Audio clips as model inputs (Gemma 4): prepared by the runtime, placed in a context like images.

    clip = Audio.from_bytes(model, wav_bytes)
    ctx.user(["What is said here?", clip])   # the clip's tokens inside the user turn
    await ctx.append_audio(clip)              # or into the KV cache now
    fwd.input_audio(clip)                     # or inside one forward pass

`from_bytes` decodes a WAV (PCM or float, any channels and rate: mixed to mono and resampled to the
model's rate) and computes the checkpoint's log-mel features; the same bytes are prepared once and,
placed after the same prefix, share their KV. `token_ids` are `<boa>`, one audio token per 40 ms, `<eoa>`.
"""

from __future__ import annotations

from typing import Any

from inferlet._host import get_host
from inferlet.image import Media
from inferlet.model import Model


class Audio(Media):
    __slots__ = ("seconds",)
    part_name = "audio"

    def __init__(self, model: Model, info: dict[str, Any]) -> None:
        super().__init__(model, info)
        self.seconds: float = float(info["seconds"])

    @classmethod
    def from_bytes(cls, model: Model, data: bytes) -> Audio:
        """Decode and prepare a WAV clip for `model`; HostError if it cannot be decoded, the model takes no
        audio, or it is over the instance's limits (clips, seconds)."""
        return cls(model, get_host().audio_prepare(model.name, bytes(data)))

    def __repr__(self) -> str:
        return f"Audio({self.key[:12]}, {self.seconds:.2f} s, {self.token_count} tokens)"
