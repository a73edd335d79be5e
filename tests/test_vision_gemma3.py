"""Gemma 3 with images: the SigLIP tower + projector and the image-aware prefill against transformers.

A tiny random Gemma3ForConditionalGeneration (transformers' own config and
model classes, a 1-layer SigLIP on 32x32 images pooled to 4 soft tokens) in
float32. The engine's image embeddings, prefill logits and 16 greedy steps
(with one and with two images in the prompt) equal transformers' run on the
same pixels with the same token_type_ids (its bidirectional image mask), and
the processor's pixels equal transformers' Gemma 3 image processor's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from engine_helpers import SeqPager, make_engine
from vision_support import GEMMA3_IMAGE, engine_greedy, gemma3_checkpoint, image_prompt, png

from pie.engine.batch import ForwardBatch, OutputSpec, Request, Sampler
from pie.engine.engine import Engine
from pie.errors import BatchError, InputError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gemma3_checkpoint(tmp_path_factory.mktemp("gemma3-vision"))


@pytest.fixture(scope="module")
def engine(ckpt: Path) -> Engine:
    return make_engine(ckpt, max_num_embeds=64, activation_dtype="float32")


@pytest.fixture(scope="module")
def reference(ckpt: Path) -> Any:
    from checkpoints import load_reference

    return load_reference(ckpt)


def _pixels(engine: Engine, placed: list[tuple[str, int]]) -> torch.Tensor:
    assert engine.vision is not None
    entries = [engine.vision.store.get(key) for key, _ in placed]
    return torch.stack([e.image.pixel_values for e in entries if e is not None])


def _hf_greedy(model: Any, tokens: list[int], pixels: torch.Tensor, steps: int) -> tuple[list[int], list[np.ndarray]]:
    ids = torch.tensor([tokens])
    with torch.no_grad():
        res = model.generate(ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                             token_type_ids=(ids == GEMMA3_IMAGE).long(), max_new_tokens=steps,
                             min_new_tokens=steps, do_sample=False, pad_token_id=0, eos_token_id=None,
                             output_logits=True, return_dict_in_generate=True)
    return res.sequences[0, len(tokens):].tolist(), [s[0].float().numpy() for s in res.logits]


def test_image_embeddings_equal_transformers(engine: Engine, reference: Any) -> None:
    placed = [(engine.prepare_image(png(s)).key, 0) for s in (1, 2)]
    pixels = _pixels(engine, placed)
    assert engine.vision is not None
    ours = engine.vision.embeddings([k for k, _ in placed])
    with torch.no_grad():
        theirs = reference.get_image_features(pixels).pooler_output
    assert theirs.shape == (2, 4, 64)
    for i, (key, _) in enumerate(placed):
        torch.testing.assert_close(ours[key], theirs[i], atol=1e-4, rtol=1e-4)
    assert float(theirs.abs().mean()) > 0.1  # the projector is not zero: the comparison can fail


def test_processor_pixels_equal_transformers(engine: Engine, ckpt: Path) -> None:
    import io
    import json

    from PIL import Image
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    data = png(3, (57, 41))
    info = engine.prepare_image(data)
    ours = _pixels(engine, [(info.key, 0)])
    hf = Gemma3ImageProcessorPil(**json.loads((ckpt / "preprocessor_config.json").read_text()))
    theirs = torch.as_tensor(np.asarray(hf(Image.open(io.BytesIO(data)), return_tensors="np")["pixel_values"]))
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=0)
    assert info.grid == (1, 4, 4) and (info.width, info.height) == (57, 41)
    assert len(info.tokens) == 6 and info.embed_rows == [1, 2, 3, 4] and info.bidirectional


@pytest.mark.parametrize("num_images", [1, 2])
def test_prefill_and_greedy_equal_transformers(engine: Engine, reference: Any, num_images: int) -> None:
    text = [[5, 17, 33], [40, 41], [7, 8, 9]][: num_images + 1]
    tokens, placed = image_prompt(engine, [png(10 + i) for i in range(num_images)], text)
    ours, our_logits = engine_greedy(engine, tokens, placed, 16)
    theirs, their_logits = _hf_greedy(reference, tokens, _pixels(engine, placed), 16)
    assert ours == theirs
    np.testing.assert_allclose(np.stack(our_logits), np.stack(their_logits), atol=2e-4, rtol=1e-4)


def test_the_image_changes_the_output(engine: Engine) -> None:
    """The embeddings really enter: another image (same tokens) gives other logits."""
    a, pa = image_prompt(engine, [png(20)], [[5, 6], [7]])
    b, pb = image_prompt(engine, [png(21)], [[5, 6], [7]])
    assert a == b
    la = engine_greedy(engine, a, pa, 1)[1][0]
    lb = engine_greedy(engine, b, pb, 1)[1][0]
    assert np.abs(la - lb).max() > 1e-3


def test_bad_placements_are_batch_errors(engine: Engine) -> None:
    tokens, placed = image_prompt(engine, [png(30)], [[5, 6], [7]])
    pager = SeqPager(engine)
    key = placed[0][0]
    cases = [
        ([(key, 1)], "do not hold image"),
        ([("0" * 64, 2)], "not held by the engine"),
        ([(key, 50)], "covers none"),
    ]
    for images, msg in cases:
        req = pager.request(0, tokens, [OutputSpec(0, Sampler())], images=images)
        with pytest.raises(BatchError, match=msg):
            engine.forward_batch(ForwardBatch([req]))
    # Split between two passes: Gemma 3's images attend both ways, so this is refused.
    first = Request(tokens=tokens[:4], positions=list(range(4)), page_ids=[0], last_page_len=4,
                    outputs=[OutputSpec(0, Sampler())], images=[(key, 2)])
    with pytest.raises(BatchError, match="split between passes"):
        engine.forward_batch(ForwardBatch([first]))
    with pytest.raises(InputError, match="cannot be decoded"):
        engine.prepare_image(b"\x89PNG not really")


def test_evicted_pixels_are_prepared_again_from_their_bytes(ckpt: Path) -> None:
    """A store of one image's pixels: preparing a second evicts the first, whose pass still runs (and
    equals a run that never lost it)."""
    small = make_engine(ckpt, max_num_embeds=64, activation_dtype="float32", image_cache_mb=0)
    assert small.vision is not None
    tokens, placed = image_prompt(small, [png(40)], [[5, 6], [7]])
    before = engine_greedy(small, tokens, placed, 1)[1][0]
    small.vision.cache = type(small.vision.cache)(0, small.vision.cache._size)  # no cached embeddings
    small.prepare_image(png(41))  # evicts png(40)'s pixels (budget 0 keeps one entry)
    assert placed[0][0] not in small.vision.store
    after = engine_greedy(small, tokens, placed, 1)[1][0]
    assert small.vision.stats.reprepared == 1
    np.testing.assert_allclose(after, before, atol=1e-6)
