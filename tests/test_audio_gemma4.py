"""Gemma 4 audio end to end: WAV bytes -> log-mel features -> the conformer audio tower
(`pie.engine.vision.gemma4_audio`) -> embeddings in the prompt's audio rows, against transformers on a
tiny random Gemma4ForConditionalGeneration with vision and audio towers (float32).

The checkpoint (`vision_support.gemma4_checkpoint(audio=True)`) says `use_bidirectional_attention =
"vision"`: image rows attend both ways on the sliding layers, audio rows never (transformers' Gemma 4
makes only vision tokens bidirectional), which the mixed prompt checks. The reference gets its features
from transformers' own `Gemma4AudioFeatureExtractor` on the same samples.
"""

from __future__ import annotations

import base64
import io
import struct
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from engine_helpers import make_engine
from inferlet_helpers import run_sdk, start_runtime
from vision_support import (
    GEMMA4_AUDIO,
    GEMMA4_IMAGE,
    audio_prompt,
    engine_greedy,
    gemma4_checkpoint,
    hf_audio_features,
    png,
    wav,
    wav_samples,
)

from inferlet import Audio, Context, HostError, Logits, Model
from pie.engine.engine import Engine
from pie.engine.vision.audio import decode_wav
from pie.engine.vision.info import MediaKind
from pie.errors import InputError
from pie.runtime.runtime import RuntimeLimits

SECONDS = [1.0, 0.7]  # 99 and 69 mel frames: 25 and 18 soft tokens


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gemma4_checkpoint(tmp_path_factory.mktemp("gemma4-audio"), audio=True)


@pytest.fixture(scope="module")
def engine(ckpt: Path) -> Engine:
    return make_engine(ckpt, max_num_embeds=256, activation_dtype="float32")


@pytest.fixture(scope="module")
def reference(ckpt: Path) -> Any:
    from checkpoints import load_reference

    return load_reference(ckpt)


def test_features_from_wav_bytes_equal_transformers(engine: Engine) -> None:
    assert engine.vision is not None
    processor = engine.vision.processors[MediaKind.AUDIO]
    clips = [wav(1, SECONDS[0]), wav(2, SECONDS[1], channels=2)]  # stereo: mixed to mono
    theirs = hf_audio_features(clips)
    for i, data in enumerate(clips):
        ours = processor.features(decode_wav(data, 16000, 30.0))
        mask = theirs["input_features_mask"][i]
        np.testing.assert_allclose(ours, theirs["input_features"][i][mask].numpy(), atol=1e-5, rtol=1e-5)
        assert ours.shape == (int(mask.sum()), 32)
    # 32-bit float and 32-bit PCM WAVs of the same samples give the same features as 16-bit PCM
    samples = wav_samples(clips[0])
    for make in (_float_wav, _pcm32_wav, _extensible_pcm16_wav):
        np.testing.assert_allclose(processor.features(decode_wav(make(samples), 16000, 30.0)),
                                   processor.features(samples), atol=1e-5)
    # another rate is resampled to the extractor's: half the samples at 8 kHz, the same duration
    assert len(decode_wav(wav(3, 1.0, rate=8000), 16000, 30.0)) == 16000


def _riff(body: bytes, fmt: bytes) -> bytes:
    return (b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(body)) + b"WAVE" + b"fmt " +
            struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(body)) + body)


def _float_wav(samples: np.ndarray) -> bytes:
    """An IEEE-float WAV (format code 3, which the stdlib `wave` module neither writes nor reads)."""
    return _riff(samples.astype("<f4").tobytes(), struct.pack("<HHIIHH", 3, 1, 16000, 16000 * 4, 4, 32))


def _extensible_pcm16_wav(samples: np.ndarray) -> bytes:
    """A WAVE_FORMAT_EXTENSIBLE 16-bit PCM WAV (its sub-format GUID starts with the PCM code, 1)."""
    fmt = struct.pack("<HHIIHHHHI", 0xFFFE, 1, 16000, 16000 * 2, 2, 16, 22, 16, 4) + struct.pack("<H", 1) + bytes(14)
    return _riff(np.round(samples * 32768.0).astype("<i2").tobytes(), fmt)


def _pcm32_wav(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(4)
        w.setframerate(16000)
        w.writeframes((samples.astype(np.float64) * (1 << 31)).astype("<i4").tobytes())
    return buf.getvalue()


def test_bad_audio_is_an_input_error(engine: Engine) -> None:
    for data, match in [(b"", "empty"), (b"not a wav at all", "not a WAV"), (wav(4, 1.0)[:30], "cannot be decoded"),
                        (png(1), "not a WAV"), (wav(4, 0.005), "too short")]:
        with pytest.raises(InputError, match=match):
            engine.prepare_audio(data)
    with pytest.raises(InputError, match=r"over the limit of 0\.5 s"):
        engine.prepare_audio(wav(5, 0.8), max_seconds=0.5)
    with pytest.raises(InputError, match="over the limit of 30 s"):
        engine.prepare_audio(wav(5, 31.0))


def test_audio_embeddings_equal_transformers(engine: Engine, reference: Any) -> None:
    clips = [wav(10, SECONDS[0]), wav(11, SECONDS[1])]
    infos = [engine.prepare_audio(c) for c in clips]
    assert engine.vision is not None
    ours = engine.vision.embeddings([i.key for i in infos])
    feats = hf_audio_features(clips)
    with torch.no_grad():
        out = reference.model.get_audio_features(feats["input_features"], feats["input_features_mask"],
                                                 return_dict=True)
    for i, info in enumerate(infos):
        theirs = out.pooler_output[i][out.attention_mask[i]]
        assert len(info.embed_rows) == theirs.shape[0] == (25, 18)[i]
        assert info.tokens == [info.tokens[0], *[GEMMA4_AUDIO] * len(info.embed_rows), info.tokens[-1]]
        torch.testing.assert_close(ours[info.key], theirs, atol=1e-4, rtol=1e-4)
    assert float(out.pooler_output.abs().mean()) > 0.1  # not near zero: the comparison can fail


def _hf_greedy(model: Any, tokens: list[int], clips: list[bytes], images: list[bytes],
               steps: int) -> tuple[list[int], list[np.ndarray]]:
    from test_vision_gemma4_engine import _hf_pixels

    ids = torch.tensor([tokens])
    kw: dict[str, Any] = {}
    if clips:
        feats = hf_audio_features(clips)
        kw.update(input_features=feats["input_features"], input_features_mask=feats["input_features_mask"])
    if images:
        pixels = _hf_pixels(images)
        kw.update(pixel_values=pixels["pixel_values"], image_position_ids=pixels["image_position_ids"])
    types = (ids == GEMMA4_IMAGE).long() + 3 * (ids == GEMMA4_AUDIO).long()  # the processor's: image 1, audio 3
    with torch.no_grad():
        res = model.generate(ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types,
                             max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0,
                             eos_token_id=None, output_logits=True, return_dict_in_generate=True, **kw)
    return res.sequences[0, len(tokens):].tolist(), [s[0].float().numpy() for s in res.logits]


@pytest.mark.parametrize("kind", ["one-clip", "two-clips", "image-and-clip"])
def test_prefill_and_greedy_equal_transformers(engine: Engine, reference: Any, kind: str) -> None:
    text = [[5, 17, 33, 40, 41, 42, 43, 44, 45], [40, 41], [7, 8, 9]]
    if kind == "image-and-clip":  # the image's rows both ways on the sliding layers, the clip's causal
        image = png(12, (17, 41))
        info = engine.prepare_image(image)
        tokens, placed = audio_prompt(engine, [wav(20, SECONDS[1])], [text[0] + [6], text[2]])
        at = len(text[0])
        tokens = tokens[:at] + info.tokens + tokens[at:]
        placed = [(info.key, at)] + [(k, row + len(info.tokens)) for k, row in placed]
        clips, images = [wav(20, SECONDS[1])], [image]
    else:
        clips = [wav(20 + i, s) for i, s in enumerate(SECONDS[:1 if kind == "one-clip" else 2])]
        tokens, placed = audio_prompt(engine, clips, text[:len(clips) + 1])
        images = []
    ours, our_logits = engine_greedy(engine, tokens, placed, 16)
    theirs, their_logits = _hf_greedy(reference, tokens, clips, images, 16)
    assert ours == theirs
    np.testing.assert_allclose(np.stack(our_logits), np.stack(their_logits), atol=2e-4, rtol=1e-4)


def test_the_clip_changes_the_output(engine: Engine) -> None:
    a, pa = audio_prompt(engine, [wav(30, 0.5)], [[5, 6], [7]])
    b, pb = audio_prompt(engine, [wav(31, 0.5)], [[5, 6], [7]])
    assert a == b
    la, lb = engine_greedy(engine, a, pa, 1)[1][0], engine_greedy(engine, b, pb, 1)[1][0]
    assert np.abs(la - lb).max() > 1e-3


def test_evicted_features_are_prepared_again_from_the_bytes(ckpt: Path, engine: Engine) -> None:
    """With no store budget, preparing clip b evicts clip a's features; a pass placing a prepares them
    again from its kept bytes, with the logits of an engine that kept them."""
    small = make_engine(ckpt, max_num_embeds=256, activation_dtype="float32", image_cache_mb=0)
    assert small.vision is not None
    a, pa = audio_prompt(small, [wav(32, 0.5)], [[5, 6], [7]])
    audio_prompt(small, [wav(33, 0.5)], [[5, 6], [7]])
    got = engine_greedy(small, a, pa, 1)[1][0]
    assert small.vision.stats.reprepared == 1
    want = engine_greedy(engine, *audio_prompt(engine, [wav(32, 0.5)], [[5, 6], [7]]), 1)[1][0]
    np.testing.assert_allclose(got, want, atol=1e-5)


# -- through the runtime and the SDK --

WHOLE = RuntimeLimits(max_page_share_per_instance=0.0)


async def _logits_after(data: bytes) -> tuple[np.ndarray, int]:
    model = Model.load()
    clip = Audio.from_bytes(model, data)
    fwd = Context(model).forward().input([5, 6, 7]).input_audio(clip).input([8, 9])
    h = fwd.probe(fwd.num_inputs - 1, Logits())
    out = await fwd.execute()
    return np.frombuffer(out.logits(h), "<f4").copy(), clip.token_count


async def test_same_clip_in_two_contexts_encoded_once(ckpt: Path, tmp_path: Path) -> None:
    data = wav(40, SECONDS[1])
    engine = {"kv_page_size": 4, "max_num_embeds": 128, "activation_dtype": "float32"}
    cold_rt = await start_runtime(ckpt, limits=WHOLE, pie_home=tmp_path / "cold", **engine)
    try:
        cold, _ = await run_sdk(cold_rt, lambda: _logits_after(data))
    finally:
        await cold_rt.shutdown(0)
    rt = await start_runtime(ckpt, limits=WHOLE, pie_home=tmp_path / "warm", **engine)
    try:
        async def body() -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
            model = Model.load()
            (a, _), (b, _) = await _logits_after(data), await _logits_after(data)
            clip = Audio.from_bytes(model, data)
            ctx = Context(model)
            ctx.user(["listen:", clip, "what is said?"])
            buffered = ctx.buffer()
            await ctx.append_audio(clip)  # a second copy, straight into the KV cache
            ctx.append([9])
            tokens = await ctx.generate(_argmax(), max_tokens=3, stop=[]).collect_tokens()
            return a, b, buffered, clip.token_ids + tokens
        a, b, buffered, out = await run_sdk(rt, body)
        vision = rt.model("tiny").groups[0].engine.engine.vision  # type: ignore[attr-defined]
        assert vision.stats.encoded == 1 and vision.stats.encoder_calls == 1
        np.testing.assert_allclose(a, cold, atol=1e-5)
        np.testing.assert_allclose(b, cold, atol=1e-5)
        assert rt.model("tiny").scheduler.stats.cached_tokens > 0  # b shared a's pages
        clip_tokens = out[:-3]
        start = buffered.index(clip_tokens[0])
        assert buffered[start:start + len(clip_tokens)] == clip_tokens and len(out) == len(clip_tokens) + 3
        rt.check_integrity()
    finally:
        await rt.shutdown(0)


def _argmax() -> Any:
    from inferlet import Sampler

    return Sampler.argmax()


async def test_runtime_limits_and_bad_clips_are_host_errors(ckpt: Path, tmp_path: Path) -> None:
    rt = await start_runtime(ckpt, limits=RuntimeLimits(max_page_share_per_instance=0.0, max_audio_seconds=0.5),
                             pie_home=tmp_path, kv_page_size=4, activation_dtype="float32")
    try:
        async def body() -> list[str]:
            model = Model.load()
            errors = []
            for data in (wav(50, 0.8), b"RIFF....WAVEjunk"):
                try:
                    Audio.from_bytes(model, data)
                except HostError as e:
                    errors.append(str(e))
            Audio.from_bytes(model, wav(51, 0.4))  # within the limit
            return errors
        errors = await run_sdk(rt, body)
        assert "over the limit of 0.5 s" in errors[0] and "cannot be decoded" in errors[1]
    finally:
        await rt.shutdown(0)


# -- over HTTP --

def _audio_messages(data: bytes, fmt: str = "wav") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [
        {"type": "text", "text": "What is said?"},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}]}]


async def _sdk_text(server: Any, name: str, data: bytes, max_tokens: int) -> str:
    """The SDK path: the same rendered prompt, the clip buffered in its place, greedy generation."""
    from inferlet import Sampler, chat
    from pie.server.api.images import marker
    from pie.server.api.served import served_model

    runtime = server.state.runtime
    served = served_model(runtime, name)
    assert served is not None and served.prepare_audio is not None
    info = served.prepare_audio(data)
    tokens, rows = served.render_chat_images([{"role": "user", "content": "What is said?" + marker(0)}], None, [info])

    async def body() -> str:
        model = Model.load(name)
        clip = Audio.from_bytes(model, data)
        ctx = Context(model)
        ctx.append(tokens[:rows[0]]).buffer_images([clip]).append(tokens[rows[0] + clip.token_count:])
        out = await ctx.generate(Sampler.argmax(), max_tokens=max_tokens, stop=chat.stop_tokens(model),
                                 auto_flush=False).collect_tokens()
        return model.tokenizer().decode(out)
    return str(await run_sdk(runtime, body))


async def test_openai_input_audio_gives_the_sdk_tokens(ckpt: Path) -> None:
    import openai
    from server_support import running_server

    from pie.engine.config import EngineConfig
    from pie.runtime.runtime import ModelSpec, RuntimeConfig

    engine = EngineConfig(model=str(ckpt), device="cpu", max_num_kv_pages=256, kv_page_size=4,
                          max_num_embeds=128, activation_dtype="float32")
    config = RuntimeConfig((ModelSpec("gemma4-audio", engine),), RuntimeLimits(max_audio_seconds=2.0))
    data = wav(60, SECONDS[1])
    async with running_server(config) as server, openai.AsyncOpenAI(
            base_url=server.http_url + "/v1", api_key="unused", max_retries=0) as client:
        reply = await client.chat.completions.create(model="gemma4-audio", messages=_audio_messages(data),  # type: ignore[arg-type]
                                                     max_tokens=6, temperature=0)
        assert reply.usage is not None and reply.usage.completion_tokens > 0
        assert reply.usage.prompt_tokens > 20  # the clip's 20 tokens and the text
        assert reply.choices[0].message.content == await _sdk_text(server, "gemma4-audio", data, 6)
        cases = [(_audio_messages(b"RIFF\x00\x00\x00\x00WAVEnothing"), r"messages\[0\]\.content\[1\]\.input_audio: the "
                  "audio cannot be decoded"),
                 (_audio_messages(data, "mp3"), "pie decodes WAV audio only"),
                 (_audio_messages(wav(61, 2.5)), "over the limit of 2 s"),
                 (_audio_messages(png(1)), "not a WAV file")]
        for messages, why in cases:
            with pytest.raises(openai.BadRequestError, match=why):
                await client.chat.completions.create(model="gemma4-audio", messages=messages, max_tokens=2)  # type: ignore[arg-type]
        again = await client.chat.completions.create(model="gemma4-audio", messages=_audio_messages(data),  # type: ignore[arg-type]
                                                     max_tokens=6, temperature=0)
        assert again.choices[0].message.content == reply.choices[0].message.content
    async with running_server() as text_server, openai.AsyncOpenAI(
            base_url=text_server.http_url + "/v1", api_key="unused", max_retries=0) as text_client:
        with pytest.raises(openai.BadRequestError, match="takes no audio"):
            await text_client.chat.completions.create(model="pie/tiny-random", messages=_audio_messages(data),  # type: ignore[arg-type]
                                                      max_tokens=2)


async def test_an_image_only_gemma4_takes_no_audio(tmp_path: Path) -> None:
    """A Gemma 4 checkpoint written without its audio tower: no audio preparer for HTTP, a HostError in the
    SDK, images still served."""
    from pie.server.api.served import served_model

    rt = await start_runtime(gemma4_checkpoint(tmp_path / "ckpt", audio=False), limits=WHOLE, pie_home=tmp_path,
                             kv_page_size=4, activation_dtype="float32")
    try:
        served = served_model(rt, "tiny")
        assert served is not None and served.prepare_audio is None and served.prepare_image is not None

        async def body() -> str:
            try:
                Audio.from_bytes(Model.load(), wav(70, 0.5))
            except HostError as e:
                return str(e)
            return ""
        assert "takes no audio" in await run_sdk(rt, body)
    finally:
        await rt.shutdown(0)
