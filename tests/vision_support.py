"""Tiny random image-text checkpoints with their preprocessor configs, and test images (nothing downloaded)."""

from __future__ import annotations

import io
import json
import wave
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from checkpoints import _COMMON, _SIGLIP, ARCHS, VOCAB
from engine_helpers import SeqPager, logits_of
from PIL import Image

from pie.engine.batch import ForwardBatch, OutputSpec, Probe, Sampler
from pie.tiny_model import write_tokenizer_files

if TYPE_CHECKING:
    from pie.engine.engine import Engine

# Gemma 3's special ids moved into the tiny vocabulary (the real ones are 255999 / 256000 / 262144).
GEMMA3_BOI, GEMMA3_EOI, GEMMA3_IMAGE = VOCAB - 4, VOCAB - 3, VOCAB - 2
GEMMA3_IMAGE_TOKENS = 4  # mm_tokens_per_image: the 4x4 patch grid pooled to 2x2


def gemma3_config(**text_overrides: Any) -> Any:
    from transformers import AutoConfig

    text = {**_COMMON, **ARCHS["gemma3_text"], **text_overrides, "model_type": "gemma3_text"}
    return AutoConfig.for_model("gemma3", text_config=text, vision_config={**_SIGLIP, "image_size": 32},
                                mm_tokens_per_image=GEMMA3_IMAGE_TOKENS, image_token_index=GEMMA3_IMAGE,
                                boi_token_index=GEMMA3_BOI, eoi_token_index=GEMMA3_EOI,
                                tie_word_embeddings=text["tie_word_embeddings"])


def gemma3_checkpoint(directory: Path, *, seed: int = 0, **text_overrides: Any) -> Path:
    """A random Gemma3ForConditionalGeneration (SigLIP tower, projector) with its preprocessor_config.json."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(gemma3_config(**text_overrides), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
        # Zero-initialised by transformers: give the projector real values.
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        proj.copy_(torch.randn_like(proj) * 0.2)
    model.save_pretrained(directory, safe_serialization=True)
    write_tokenizer_files(directory, VOCAB)
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Gemma3ImageProcessor", "do_convert_rgb": True, "do_resize": True,
        "size": {"height": 32, "width": 32}, "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "do_pan_and_scan": None}))
    return directory


# Gemma 4: the same three tiny-vocabulary ids; patches of 4 pixels pooled 2x2, the smallest soft-token budget.
GEMMA4_BOI, GEMMA4_EOI, GEMMA4_IMAGE = GEMMA3_BOI, GEMMA3_EOI, GEMMA3_IMAGE
GEMMA4_PREPROCESSOR: dict[str, Any] = {  # the keys of a Gemma 4 preprocessor_config.json, tiny sizes
    "do_convert_rgb": True, "do_normalize": False, "do_rescale": True, "do_resize": True,
    "image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0], "image_processor_type": "Gemma4ImageProcessor",
    "max_soft_tokens": 70, "patch_size": 4, "pooling_kernel_size": 2, "resample": 3, "rescale_factor": 1 / 255,
}


# Gemma 4 audio: three more tiny-vocabulary ids; 32 mel bins (the first subsampling conv's channels).
GEMMA4_BOA, GEMMA4_EOA, GEMMA4_AUDIO = VOCAB - 7, VOCAB - 6, VOCAB - 5
GEMMA4_AUDIO_CONFIG: dict[str, Any] = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "subsampling_conv_channels": [32, 8],
    "conv_kernel_size": 5, "attention_chunk_size": 12, "attention_context_left": 13, "attention_context_right": 0,
    "output_proj_dims": 48, "use_clipped_linears": True,
}
GEMMA4_FEATURES: dict[str, Any] = {  # the feature extractor's keys of a Gemma 4 preprocessor_config.json
    "feature_extractor_type": "Gemma4AudioFeatureExtractor", "feature_size": 32, "sampling_rate": 16000,
    "frame_length_ms": 20.0, "hop_length_ms": 10.0, "min_frequency": 0.0, "max_frequency": 8000.0,
    "mel_floor": 0.001, "padding_value": 0.0, "return_attention_mask": True, "dither": 0.0,
    "input_scale_factor": 1.0, "preemphasis": 0.0,
}


def gemma4_config(bidirectional: bool = True, audio: bool = False, **text_overrides: Any) -> Any:
    """Gemma 4 with the text config of the family tests (PLE, KV sharing, window 8, soft-cap) and a 2-layer
    vision tower with clamped linears and standardisation; `bidirectional`: image rows attend both ways on
    the sliding layers (`use_bidirectional_attention = "vision"`, as the larger checkpoints say); `audio`: a
    2-layer conformer audio tower too."""
    from transformers import Gemma4Config

    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 8, "patch_size": 4, "pooling_kernel_size": 2,
              "position_embedding_size": 64, "use_clipped_linears": True, "standardize": True}
    text = {**_COMMON, **ARCHS["gemma4_text"], **text_overrides,
            "use_bidirectional_attention": "vision" if bidirectional else None}
    return Gemma4Config(vision_config=vision, text_config=text, audio_config=GEMMA4_AUDIO_CONFIG if audio else None,
                        image_token_id=GEMMA4_IMAGE, boi_token_id=GEMMA4_BOI, eoi_token_id=GEMMA4_EOI,
                        audio_token_id=GEMMA4_AUDIO, boa_token_id=GEMMA4_BOA, eoa_token_index=GEMMA4_EOA,
                        tie_word_embeddings=text["tie_word_embeddings"])


def gemma4_spread(model: Any) -> None:
    """Unit-gain vision and audio weights, norms off 1, finite clip bounds that some values pass, a real
    standardisation: at transformers' init the attention is near uniform and the clamps never bite."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
            elif p.ndim >= 2 and ("vision" in name or "audio" in name):
                p.normal_(0.0, (3.0 if "q_proj" in name or "k_proj" in name else 1.0) / p[-1].numel() ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith(("input_min", "output_min")):
                b.fill_(-1.5)
            elif name.endswith(("input_max", "output_max")):
                b.fill_(1.5)
            elif name.endswith("std_bias"):
                b.copy_(torch.randn_like(b))
            elif name.endswith("std_scale"):
                b.copy_(torch.rand_like(b) + 0.5)


def gemma4_model(bidirectional: bool = True, seed: int = 0, audio: bool = False, **text_overrides: Any) -> Any:
    from transformers import Gemma4ForConditionalGeneration

    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(gemma4_config(bidirectional, audio, **text_overrides)).eval()
    gemma4_spread(model)
    return model


def gemma4_checkpoint(directory: Path, *, bidirectional: bool = True, seed: int = 0, audio: bool = False,
                      **text_overrides: Any) -> Path:
    """A random Gemma4ForConditionalGeneration (vision tower, embedder; `audio`: the audio tower and its
    embedder too) with its preprocessor_config.json."""
    model = gemma4_model(bidirectional, seed, audio, **text_overrides)
    model.save_pretrained(directory, safe_serialization=True)
    write_tokenizer_files(directory, VOCAB)
    (directory / "preprocessor_config.json").write_text(
        json.dumps({**GEMMA4_PREPROCESSOR, **(GEMMA4_FEATURES if audio else {})}))
    return directory



async def fork_after_image(data: bytes, max_tokens: int = 8) -> tuple[list[int], list[int], list[int], list[int]]:
    """An inferlet body: [5, 6] + image + [7, 8] flushed, then forked; the context, the fork and a fresh
    context of the same prompt each generate `max_tokens` greedy tokens after [9]. Returns the three token
    lists and the image's placeholder tokens."""
    from inferlet import Context, Image, Model
    from inferlet import Sampler as SdkSampler

    model = Model.load()
    image = Image.from_bytes(model, data)
    ctx = Context(model)
    ctx.append([5, 6])
    await ctx.append_image(image)
    ctx.append([7, 8])
    await ctx.flush()
    fork = ctx.fork()
    opts = {"max_tokens": max_tokens, "stop": [], "auto_flush": False}
    ctx.append([9])
    fork.append([9])
    a = await ctx.generate(SdkSampler.argmax(), **opts).collect_tokens()
    b = await fork.generate(SdkSampler.argmax(), **opts).collect_tokens()
    fresh = Context(model)
    fresh.append([5, 6]).buffer_images([image]).append([7, 8, 9])
    c = await fresh.generate(SdkSampler.argmax(), **opts).collect_tokens()
    return a, b, c, image.token_ids

def png(seed: int, size: tuple[int, int] = (40, 52)) -> bytes:
    """A random RGB image (width, height) as PNG bytes."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def image_prompt(engine: Engine, images: list[bytes],
                 text: list[list[int]]) -> tuple[list[int], list[tuple[str, int]]]:
    """text[0] image0 text[1] image1 ... text[-1] -> (tokens, Request.images)."""
    tokens, placed = list(text[0]), []
    for data, after in zip(images, text[1:], strict=True):
        info = engine.prepare_image(data)
        placed.append((info.key, len(tokens)))
        tokens += info.tokens + after
    return tokens, placed


def image_positions_1d(engine: Engine, num_tokens: int, images: list[tuple[str, int]], start: int = 0) -> list[int]:
    """The 1-D positions of a prompt of `num_tokens` with `images` (key, row) in it: text one apart, an
    image's tokens at its start + `ImageInfo.position_offsets`, the text after it at start + position_span."""
    assert engine.vision is not None
    at = {row: engine.vision.info(key) for key, row in images}
    out: list[int] = []
    pos, row = start, 0
    while row < num_tokens:
        info = at.get(row)
        if info is None:
            out.append(pos)
            pos, row = pos + 1, row + 1
        else:
            out += [pos + o for o in info.position_offsets]
            pos, row = pos + info.position_span, row + len(info.tokens)
    return out


def engine_greedy(engine: Engine, tokens: list[int], images: list[tuple[str, int]],
                  steps: int) -> tuple[list[int], list[np.ndarray]]:
    """`steps` greedy tokens of one sequence (the prompt with its images first) and each step's logits."""
    pager = SeqPager(engine)
    out: list[int] = []
    logits: list[np.ndarray] = []
    feed, imgs = tokens, images
    positions = image_positions_1d(engine, len(tokens), images)
    slot = 0 if engine.states is not None else None  # a hybrid's recurrent state
    for _ in range(steps):
        req = pager.request(0, feed, [OutputSpec(len(feed) - 1, Sampler("argmax")),
                                      OutputSpec(len(feed) - 1, probe=Probe("logits"))], positions=positions,
                            images=imgs, state_slot=slot)
        tok, row = engine.forward_batch(ForwardBatch([req])).outputs[0]
        out.append(int(tok))  # type: ignore[arg-type]
        logits.append(logits_of(row))  # type: ignore[arg-type]
        feed, imgs, positions = [out[-1]], None, [positions[-1] + 1]
    return out, logits


def wav(seed: int, seconds: float, *, rate: int = 16000, channels: int = 1, width: int = 2) -> bytes:
    """A random PCM WAV (a chirp plus noise) of `width`-byte samples."""
    rng = np.random.default_rng(seed)
    n = round(seconds * rate)
    t = np.arange(n) / rate
    mono = 0.4 * np.sin(2 * np.pi * (200 + 300 * seed) * t * (1 + t)) + 0.1 * rng.standard_normal(n)
    samples = np.stack([mono * (0.5 + 0.5 * c) for c in range(channels)], axis=1)
    scale = float(1 << (8 * width - 1)) - 1
    pcm = np.clip(samples * scale, -scale, scale).astype({2: "<i2", 4: "<i4"}[width])
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def wav_samples(data: bytes) -> np.ndarray:
    """A 16-bit PCM WAV's samples as a mono float waveform, as a user would hand them to transformers."""
    with wave.open(io.BytesIO(data)) as w:
        assert w.getsampwidth() == 2
        raw = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, w.getnchannels())
    return (raw.astype(np.float32) / 32768.0).mean(axis=1)


def hf_audio_features(clips: list[bytes]) -> dict[str, torch.Tensor]:
    """transformers' `Gemma4AudioFeatureExtractor` on the clips' samples: input_features, input_features_mask."""
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    kw = {k: v for k, v in GEMMA4_FEATURES.items() if k != "feature_extractor_type"}
    return dict(Gemma4AudioFeatureExtractor(**kw)([wav_samples(c) for c in clips], return_tensors="pt"))


def audio_prompt(engine: Engine, clips: list[bytes],
                 text: list[list[int]]) -> tuple[list[int], list[tuple[str, int]]]:
    """text[0] clip0 text[1] clip1 ... text[-1] -> (tokens, Request.images)."""
    tokens, placed = list(text[0]), []
    for data, after in zip(clips, text[1:], strict=True):
        info = engine.prepare_audio(data)
        placed.append((info.key, len(tokens)))
        tokens += info.tokens + after
    return tokens, placed
