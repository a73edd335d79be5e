"""Images through the runtime and the SDK on a tiny random Gemma 3 (float32, CPU); the tests of what
every family must do (encode once and share, fork, chat slots) on a tiny Gemma 4 too.

`Image.from_bytes` prepares an image on the engine; `append_image`, `chat.user`
with image parts and `Forward.input_image` place it. The same image in two
contexts is encoded once and its pages are shared, with logits equal to a cold
run; a fork after an image continues like a recomputation; chunked prefills
never split an image and equal an unchunked one; the instance limits and
undecodable bytes are HostErrors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from inferlet_helpers import run_sdk, start_runtime
from vision_support import fork_after_image, gemma3_checkpoint, gemma4_checkpoint, png

from inferlet import Context, HostError, Image, Logits, Model, Sampler
from pie.runtime.runtime import Runtime, RuntimeLimits

WHOLE = RuntimeLimits(max_page_share_per_instance=0.0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gemma3_checkpoint(tmp_path_factory.mktemp("gemma3-rt"))


@pytest.fixture(scope="module")
def gemma4_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gemma4_checkpoint(tmp_path_factory.mktemp("gemma4-rt"))


@pytest.fixture(params=["gemma3", "gemma4"])
def family_ckpt(request: pytest.FixtureRequest) -> Path:
    """Each image family's checkpoint (Gemma 4: ~65 tokens an image, its rows both ways on sliding layers)."""
    return Path(request.getfixturevalue("ckpt" if request.param == "gemma3" else "gemma4_ckpt"))


async def _runtime(ckpt: Path, tmp_path: Path, limits: RuntimeLimits = WHOLE, **engine: Any) -> Runtime:
    engine = {"kv_page_size": 4, "max_num_embeds": 128, "activation_dtype": "float32", **engine}
    return await start_runtime(ckpt, limits=limits, pie_home=tmp_path, **engine)


def _stats(rt: Runtime) -> Any:
    vision = rt.model("tiny").groups[0].engine.engine.vision  # type: ignore[attr-defined]
    return vision.stats


async def _last_logits(ctx: Context, tokens: list[int], image: Image | None, after: list[int]) -> np.ndarray:
    fwd = ctx.forward().input(tokens)
    if image is not None:
        fwd.input_image(image)
    fwd.input(after)
    h = fwd.probe(fwd.num_inputs - 1, Logits())
    out = await fwd.execute()
    return np.frombuffer(out.logits(h), "<f4").copy()


async def _cold(ckpt: Path, tmp_path: Path, data: bytes) -> np.ndarray:
    rt = await _runtime(ckpt, tmp_path / "cold")
    try:
        async def body() -> np.ndarray:
            model = Model.load()
            return await _last_logits(Context(model), [5, 6, 7], Image.from_bytes(model, data), [8, 9])
        return await run_sdk(rt, body)
    finally:
        await rt.shutdown(0)


async def test_same_image_encoded_once_and_shared(family_ckpt: Path, tmp_path: Path) -> None:
    data, other = png(1), png(2)
    cold = await _cold(family_ckpt, tmp_path, data)
    rt = await _runtime(family_ckpt, tmp_path)
    try:
        async def body() -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
            model = Model.load()
            a = await _last_logits(Context(model), [5, 6, 7], Image.from_bytes(model, data), [8, 9])
            b = await _last_logits(Context(model), [5, 6, 7], Image.from_bytes(model, data), [8, 9])
            c = await _last_logits(Context(model), [5, 6, 7], Image.from_bytes(model, other), [8, 9])
            return a, b, c, Image.from_bytes(model, data).token_count
        stats = rt.model("tiny").scheduler.stats
        a, b, c, count = await run_sdk(rt, body)
        assert _stats(rt).encoded == 2  # `data` once, `other` once
        np.testing.assert_allclose(a, cold, atol=1e-5)
        np.testing.assert_allclose(b, cold, atol=1e-5)
        assert np.abs(c - a).max() > 1e-3  # same placeholder tokens, other image: other logits
        # b shared a's full pages of 4 (Gemma 3: slots 0..7 of 11, text and the image); c only the first (text
        # and the begin-of-image token).
        total = 3 + count + 2
        assert total % 4 and stats.cached_tokens == 4 * (total // 4) + 4
        rt.check_integrity()
    finally:
        await rt.shutdown(0)


async def test_fork_after_an_image_equals_recompute(family_ckpt: Path, tmp_path: Path) -> None:
    rt = await _runtime(family_ckpt, tmp_path)
    try:
        a, b, c, _ = await run_sdk(rt, lambda: fork_after_image(png(3)))
        assert a == b == c and len(a) == 8
        assert _stats(rt).encoded == 1
    finally:
        await rt.shutdown(0)


async def test_chunked_prefill_never_splits_an_image(ckpt: Path, tmp_path: Path) -> None:
    """max_batch_tokens = 8: the chunk [0, 8) would end inside the image's rows 6..9; it stops at 6."""
    data = png(4)
    results = []
    for batch in (64, 8):
        rt = await _runtime(ckpt, tmp_path / str(batch), max_batch_tokens=batch)
        try:
            async def body() -> np.ndarray:
                model = Model.load()
                return await _last_logits(Context(model), [5, 6, 7, 8, 9], Image.from_bytes(model, data), [10, 11])
            results.append(await run_sdk(rt, body))
        finally:
            await rt.shutdown(0)
    np.testing.assert_allclose(results[1], results[0], atol=1e-5)


async def test_chat_user_fills_the_image_slot(family_ckpt: Path, tmp_path: Path) -> None:
    rt = await _runtime(family_ckpt, tmp_path)
    try:
        async def body() -> tuple[list[int], list[int], list[int]]:
            model = Model.load()
            image = Image.from_bytes(model, png(5))
            ctx = Context(model)
            ctx.user(["look:", image, "what is it?"])
            buffered = ctx.buffer()
            tokens = await ctx.generate(Sampler.argmax(), max_tokens=4, stop=[]).collect_tokens()
            return buffered, tokens, image.token_ids
        buffered, tokens, image_tokens = await run_sdk(rt, body)
        assert len(tokens) == 4
        # <boi>, the soft tokens (Gemma 3: 4; Gemma 4: one per pooled block), <eoi>, once in the prompt
        assert len(image_tokens) == (6 if family_ckpt.name.startswith("gemma3") else 65)
        start = buffered.index(image_tokens[0])
        assert buffered[start:start + len(image_tokens)] == image_tokens
        assert _stats(rt).encoded == 1
    finally:
        await rt.shutdown(0)


async def test_limits_and_bad_bytes_are_host_errors(ckpt: Path, tmp_path: Path) -> None:
    rt = await _runtime(ckpt, tmp_path, RuntimeLimits(max_page_share_per_instance=0.0, max_images_per_instance=1,
                                                     max_image_pixels=60 * 60))
    try:
        async def body() -> list[str]:
            model = Model.load()
            errors = []
            for data in (b"not an image", png(6, (80, 80))):
                try:
                    Image.from_bytes(model, data)
                except HostError as e:
                    errors.append(str(e))
            Image.from_bytes(model, png(7))
            try:
                Image.from_bytes(model, png(8))
            except HostError as e:
                errors.append(str(e))
            ctx = Context(model)
            try:  # placeholder tokens that are not the image's
                await ctx.forward().input([5, 6, 7]).execute()
                fwd = ctx.forward().input([1, 2, 3, 4, 5, 6])
                fwd._images = [(0, Image.from_bytes(model, png(7)))]
                await fwd.execute()
            except HostError as e:
                errors.append(str(e))
            return errors
        errors = await run_sdk(rt, body)
        assert "cannot be decoded" in errors[0]
        assert "80x80 = 6400 pixels, over the limit of 3600" in errors[1]
        assert "max_images_per_instance" in errors[2]
        assert "placeholder tokens" in errors[3]
    finally:
        await rt.shutdown(0)


IMAGE_PROGRAM = '''
import base64

from inferlet import Context, Image, Model, Sampler


async def main(input):
    model = Model.load()
    image = Image.from_bytes(model, base64.b64decode(input["image"]))
    ctx = Context(model)
    ctx.append([5, 6])
    await ctx.append_image(image)
    ctx.append([7, 8])
    tokens = await ctx.generate(Sampler.argmax(), max_tokens=6, stop=[], auto_flush=False).collect_tokens()
    return " ".join(str(t) for t in tokens)
'''


async def test_an_isolated_inferlet_takes_images_like_a_trusted_one(ckpt: Path, tmp_path: Path) -> None:
    """The image bytes and the placements cross the sandbox's IPC as plain data."""
    import base64
    import json

    from inferlet_helpers import launch

    from pie.runtime.sandbox import SandboxPolicy
    from pie.runtime.sandbox.server import run_isolated

    programs = tmp_path / "programs"
    (programs / "image-gen").mkdir(parents=True)
    (programs / "image-gen" / "Pie.toml").write_text('[package]\nname = "image-gen"\nversion = "0.1.0"\n')
    (programs / "image-gen" / "main.py").write_text(IMAGE_PROGRAM)
    rt = await start_runtime(ckpt, limits=WHOLE, pie_home=tmp_path, paths=(programs,), kv_page_size=4,
                             max_num_embeds=64, activation_dtype="float32")
    try:
        inputs = {"image": base64.b64encode(png(9)).decode()}
        trusted, _ = await launch(rt, "image-gen", inputs)
        assert trusted.kind == "return", trusted.value
        resolved = rt.registry.resolve("image-gen")
        policy = SandboxPolicy(allow_weaker=True, scratch_root=tmp_path / "scratch")

        async def body(instance: Any) -> str:
            return await run_isolated(resolved, json.dumps(inputs), instance.host, instance.emit, policy,
                                      username=instance.username, instance_id=instance.id)

        events = [e async for e in rt.spawn(body, program=resolved.spec, username="alice").events()]
        assert events[-1].kind == "return", events[-1].value
        assert events[-1].value == trusted.value and len(trusted.value.split()) == 6
    finally:
        await rt.shutdown(0)


async def test_prefix_sharing_can_end_inside_an_image(ckpt: Path, tmp_path: Path) -> None:
    """Pages of 2: the second context attaches [5, boi] [i1, i2] from the trie and computes from i3 on; i3's
    logits (it attends to i4 too: Gemma 3's image rows see each other both ways) equal the first context's."""
    rt = await _runtime(ckpt, tmp_path, kv_page_size=2)
    try:
        async def body() -> list[np.ndarray]:
            model = Model.load()
            image = Image.from_bytes(model, png(15))
            rows = []
            for _ in range(2):
                fwd = Context(model).forward().input([5]).input_image(image).input([8])
                h = fwd.probe(4, Logits())  # i3: the third soft token (rows: 5, boi, i1, i2, i3, ...)
                rows.append(np.frombuffer((await fwd.execute()).logits(h), "<f4").copy())
            return rows
        first, second = await run_sdk(rt, body)
        assert rt.model("tiny").scheduler.stats.cached_tokens == 4  # [5, boi] [i1, i2]
        np.testing.assert_allclose(second, first, atol=1e-5)
        assert _stats(rt).encoded == 1
    finally:
        await rt.shutdown(0)
