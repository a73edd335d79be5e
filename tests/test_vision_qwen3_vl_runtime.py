"""Qwen3-VL images through the runtime and the SDK (tiny random checkpoint, float32, CPU).

An image with M-RoPE takes fewer positions than tokens, so the context's next position is its
seq_len less what its images saved: the text after an image, the generated tokens (step by step and
in a run-ahead stream) and a fork's continuation all sit where transformers puts them. The same
image in two contexts is encoded once and its pages are shared, with logits equal to a cold run; a
fork after an image continues like a recomputation; a chunked prefill may end inside an image (its
rows are causal) and equals an unchunked one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from inferlet_helpers import run_sdk, start_runtime
from test_vision_qwen3_vl_engine import _hf_greedy, qwen_vl_checkpoint
from vision_support import fork_after_image, png

import inferlet.generation
from inferlet import Context, Image, Logits, Model, Sampler
from pie.runtime.runtime import Runtime, RuntimeLimits

WHOLE = RuntimeLimits(max_page_share_per_instance=0.0)
SIZE = (50, 30)  # 8 x 12 patches: 4 x 6 merged pads, 26 tokens, position span 8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return qwen_vl_checkpoint(tmp_path_factory.mktemp("qwen3vl-rt"), "qwen3_vl")


@pytest.fixture(scope="module")
def reference(ckpt: Path) -> Any:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32,
                                                       attn_implementation="eager").eval()


async def _runtime(ckpt: Path, tmp_path: Path, **engine: Any) -> Runtime:
    return await start_runtime(ckpt, limits=WHOLE, pie_home=tmp_path, **{
        "kv_page_size": 4, "max_num_embeds": 64, "activation_dtype": "float32", **engine})


def _engine(rt: Runtime) -> Any:
    return rt.model("tiny").groups[0].engine.engine  # type: ignore[attr-defined]


async def _last_logits(ctx: Context, tokens: list[int], image: Image, after: list[int]) -> np.ndarray:
    fwd = ctx.forward().input(tokens).input_image(image).input(after)
    h = fwd.probe(fwd.num_inputs - 1, Logits())
    out = await fwd.execute()
    return np.frombuffer(out.logits(h), "<f4").copy()


@pytest.mark.parametrize("runahead", [True, False])
async def test_generation_after_images_equals_transformers(ckpt: Path, reference: Any, tmp_path: Path,
                                                           runahead: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inferlet.generation, "RUNAHEAD", runahead)
    data = [png(1, SIZE), png(2, (17, 41))]
    rt = await _runtime(ckpt, tmp_path)
    try:
        async def body() -> tuple[list[int], list[int], int, int]:
            model = Model.load()
            images = [Image.from_bytes(model, d) for d in data]
            ctx = Context(model)
            ctx.append([5, 17, 33])
            await ctx.append_image(images[0])
            ctx.append([40, 41]).buffer_images([images[1]]).append([7, 8, 9])
            prompt = [5, 17, 33, *images[0].token_ids, 40, 41, *images[1].token_ids, 7, 8, 9]
            tokens = await ctx.generate(Sampler.argmax(), max_tokens=16, stop=[], auto_flush=False).collect_tokens()
            return prompt, tokens, ctx.seq_len, ctx.next_position
        prompt, tokens, seq_len, next_position = await run_sdk(rt, body)
        saved = sum(len(i.tokens) - i.position_span for i in map(_engine(rt).vision.info, [
            _engine(rt).prepare_image(d).key for d in data]))
        assert saved > 0 and next_position == seq_len - saved
        theirs, _ = _hf_greedy(reference, _engine(rt), prompt, data, 16)
        assert tokens == theirs
        rt.check_integrity()
    finally:
        await rt.shutdown(0)


async def test_same_image_encoded_once_and_shared(ckpt: Path, tmp_path: Path) -> None:
    data, other = png(3, SIZE), png(4, SIZE)
    cold_rt = await _runtime(ckpt, tmp_path / "cold")
    try:
        async def cold_body() -> np.ndarray:
            model = Model.load()
            return await _last_logits(Context(model), [5, 6, 7], Image.from_bytes(model, data), [8, 9])
        cold = await run_sdk(cold_rt, cold_body)
    finally:
        await cold_rt.shutdown(0)
    rt = await _runtime(ckpt, tmp_path)
    try:
        async def body() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            model = Model.load()
            a = await _last_logits(Context(model), [5, 6, 7], Image.from_bytes(model, data), [8, 9])
            b = await _last_logits(Context(model), [5, 6, 7], Image.from_bytes(model, data), [8, 9])
            c = await _last_logits(Context(model), [5, 6, 7], Image.from_bytes(model, other), [8, 9])
            return a, b, c
        stats = rt.model("tiny").scheduler.stats
        a, b, c = await run_sdk(rt, body)
        assert _engine(rt).vision.stats.encoded == 2  # `data` once, `other` once
        np.testing.assert_allclose(a, cold, atol=1e-5)
        np.testing.assert_allclose(b, cold, atol=1e-5)
        assert np.abs(c - a).max() > 1e-3  # same placeholder tokens, other image: other logits
        # 31 tokens: b shared a's seven full pages (28 slots, the image's and the text after it, at
        # M-RoPE positions); c only the first (text and <|vision_start|>, no embedding row).
        assert stats.cached_tokens == 28 + 4
        rt.check_integrity()
    finally:
        await rt.shutdown(0)


async def test_fork_after_an_image_equals_recompute(ckpt: Path, reference: Any, tmp_path: Path) -> None:
    data = png(5, SIZE)
    rt = await _runtime(ckpt, tmp_path)
    try:
        a, b, c, image_tokens = await run_sdk(rt, lambda: fork_after_image(data))
        assert a == b == c and len(a) == 8
        assert _engine(rt).vision.stats.encoded == 1
        assert a == _hf_greedy(reference, _engine(rt), [5, 6, *image_tokens, 7, 8, 9], [data], 8)[0]
        rt.check_integrity()
    finally:
        await rt.shutdown(0)


async def test_a_chunk_may_end_inside_an_image(ckpt: Path, tmp_path: Path) -> None:
    """max_batch_tokens = 32: the 38-token prompt's first chunk [0, 32) ends inside the image's rows
    10..35, so the second chunk places it at row -22 (its first rows already computed)."""
    data = png(6, SIZE)
    results = []
    for batch in (64, 32):
        rt = await _runtime(ckpt, tmp_path / str(batch), max_batch_tokens=batch)
        try:
            async def body() -> np.ndarray:
                model = Model.load()
                return await _last_logits(Context(model), list(range(5, 15)), Image.from_bytes(model, data), [20, 21])
            results.append(await run_sdk(rt, body))
            assert rt.model("tiny").scheduler.stats.batches == (1 if batch == 64 else 2)
        finally:
            await rt.shutdown(0)
    np.testing.assert_allclose(results[1], results[0], atol=1e-5)
