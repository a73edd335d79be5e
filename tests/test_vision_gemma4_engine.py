"""Gemma 4 with images through the engine: the vision tower (`pie.engine.vision.gemma4`) plugged into the
engine's image path, against transformers on a tiny random Gemma4ForConditionalGeneration (float32).

The checkpoint (`vision_support.gemma4_checkpoint`) has the family tests' text config (per-layer
embeddings, KV sharing, a window of 8 on its sliding layers, soft-cap) and says
`use_bidirectional_attention = "vision"`: an image's ~60 soft tokens attend to each other both ways on
the sliding layers (the window of 8 still ANDed on top) and causally on the full-attention layers, as
transformers' `create_masks_for_vision_model` masks them. The reference gets its pixels from
transformers' own `Gemma4ImageProcessorPil` on the same decoded images, and `mm_token_type_ids`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from engine_helpers import SeqPager, logits_of, make_engine
from PIL import Image
from vision_support import (
    GEMMA4_IMAGE,
    GEMMA4_PREPROCESSOR,
    engine_greedy,
    gemma4_checkpoint,
    image_prompt,
    png,
)

from pie.engine.batch import ForwardBatch, OutputSpec, Probe, Sampler
from pie.engine.engine import Engine
from pie.errors import BatchError

SIZES = [(40, 52), (17, 41)]  # (width, height): scaled up to 9 x 7 and 12 x 5 blocks: 63 and 60 soft tokens


# The checkpoint, by its `use_bidirectional_attention` (indirect parametrization of `ckpt`).
BOTH = pytest.mark.parametrize("ckpt", [True, False], ids=["bidirectional", "causal"], indirect=True)
BIDIRECTIONAL = pytest.mark.parametrize("ckpt", [True], ids=["bidirectional"], indirect=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    return gemma4_checkpoint(tmp_path_factory.mktemp("gemma4-vision"), bidirectional=request.param)


@pytest.fixture(scope="module")
def engine(ckpt: Path) -> Engine:
    return make_engine(ckpt, max_num_embeds=256, activation_dtype="float32")


@pytest.fixture(scope="module")
def reference(ckpt: Path) -> Any:
    from checkpoints import load_reference

    return load_reference(ckpt)


def _hf_pixels(images: list[bytes]) -> dict[str, torch.Tensor]:
    """transformers' processor on the decoded images: pixel_values, image_position_ids, soft-token counts."""
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    kw = {k: v for k, v in GEMMA4_PREPROCESSOR.items() if k != "image_processor_type"}
    pil: list[Image.Image] = [Image.open(io.BytesIO(d)) for d in images]
    return dict(Gemma4ImageProcessorPil(**kw)(images=pil, return_tensors="pt"))


def _hf_greedy(model: Any, tokens: list[int], images: list[bytes],
               steps: int) -> tuple[list[int], list[np.ndarray]]:
    ids = torch.tensor([tokens])
    pixels = _hf_pixels(images)
    with torch.no_grad():
        res = model.generate(ids, attention_mask=torch.ones_like(ids), pixel_values=pixels["pixel_values"],
                             image_position_ids=pixels["image_position_ids"],
                             mm_token_type_ids=(ids == GEMMA4_IMAGE).long(), max_new_tokens=steps,
                             min_new_tokens=steps, do_sample=False, pad_token_id=0, eos_token_id=None,
                             output_logits=True, return_dict_in_generate=True)
    return res.sequences[0, len(tokens):].tolist(), [s[0].float().numpy() for s in res.logits]


def _prompt(engine: Engine, images: list[bytes]) -> tuple[list[int], list[tuple[str, int]]]:
    # 9 text tokens before the first image: the window of 8 cuts the image rows off from them
    text = [[5, 17, 33, 40, 41, 42, 43, 44, 45], [40, 41], [7, 8, 9]][: len(images) + 1]
    return image_prompt(engine, images, text)


@BIDIRECTIONAL  # the tower does not depend on the decoder's mask
def test_image_embeddings_equal_transformers(engine: Engine, reference: Any) -> None:
    images = [png(1, SIZES[0]), png(2, SIZES[1])]
    infos = [engine.prepare_image(d) for d in images]
    assert engine.vision is not None
    ours = engine.vision.embeddings([i.key for i in infos])
    pixels = _hf_pixels(images)
    assert [len(i.embed_rows) for i in infos] == pixels["num_soft_tokens_per_image"].tolist() == [63, 60]
    with torch.no_grad():
        theirs = reference.model.get_image_features(pixel_values=pixels["pixel_values"],
                                                    image_position_ids=pixels["image_position_ids"]).pooler_output
    for info, their in zip(infos, theirs, strict=True):
        torch.testing.assert_close(ours[info.key], their, atol=1e-4, rtol=1e-4)
    assert float(theirs[0].abs().mean()) > 0.1  # not near zero: the comparison can fail


@pytest.mark.parametrize(("ckpt", "num_images"), [(True, 1), (True, 2), (False, 1)],
                         ids=["bidirectional-1", "bidirectional-2", "causal-1"], indirect=["ckpt"])
def test_prefill_and_greedy_equal_transformers(engine: Engine, reference: Any, num_images: int) -> None:
    images = [png(10 + i, size) for i, size in enumerate(SIZES[:num_images])]
    tokens, placed = _prompt(engine, images)
    ours, our_logits = engine_greedy(engine, tokens, placed, 16)
    theirs, their_logits = _hf_greedy(reference, tokens, images, 16)
    assert ours == theirs
    np.testing.assert_allclose(np.stack(our_logits), np.stack(their_logits), atol=2e-4, rtol=1e-4)


def _every_row(engine: Engine, tokens: list[int], placed: list[tuple[str, int]]) -> np.ndarray:
    outputs = [OutputSpec(j, probe=Probe("logits")) for j in range(len(tokens))]
    res = engine.forward_batch(ForwardBatch([SeqPager(engine).request(0, tokens, outputs, images=placed)]))
    return np.stack([logits_of(v) for v in res.outputs[0]])  # type: ignore[arg-type]


@BOTH
def test_every_prefill_row_equals_transformers_and_sees_the_mask(engine: Engine, reference: Any) -> None:
    """Every row's logits, the image rows' included (after the image, the KV-shared layers hide the image
    rows' full-attention outputs from the text rows), equal transformers'; the image block on every layer
    (Gemma 3's rule), or on none, gives other logits, so the comparison sees which layers attend both ways."""
    assert engine.vision is not None
    bidirectional = engine.vision.bidirectional
    images = [png(10, SIZES[0])]
    tokens, placed = _prompt(engine, images)
    pixels = _hf_pixels(images)
    ids = torch.tensor([tokens])
    with torch.no_grad():
        theirs = reference(input_ids=ids, pixel_values=pixels["pixel_values"],
                           image_position_ids=pixels["image_position_ids"],
                           mm_token_type_ids=(ids == GEMMA4_IMAGE).long()).logits[0].numpy()
    np.testing.assert_allclose(_every_row(engine, tokens, placed), theirs, atol=2e-4, rtol=1e-4)
    wrong = {"sliding_only": False} if bidirectional else {"bidirectional": True, "sliding_only": True}
    saved = {k: getattr(engine.vision, k) for k in wrong}
    try:
        for k, v in wrong.items():
            setattr(engine.vision, k, v)
        other = _every_row(engine, tokens, placed)
    finally:
        for k, v in saved.items():
            setattr(engine.vision, k, v)
    assert np.abs(other - theirs).max() > 1e-3


@BIDIRECTIONAL
def test_the_image_changes_the_output(engine: Engine) -> None:
    a, pa = image_prompt(engine, [png(20, SIZES[1])], [[5, 6], [7]])
    b, pb = image_prompt(engine, [png(21, SIZES[1])], [[5, 6], [7]])
    assert a == b
    la, lb = engine_greedy(engine, a, pa, 1)[1][0], engine_greedy(engine, b, pb, 1)[1][0]
    assert np.abs(la - lb).max() > 1e-3


@BOTH
def test_an_image_split_between_passes(engine: Engine) -> None:
    """Refused where the image rows attend both ways; where they do not, two passes equal one."""
    assert engine.vision is not None
    bidirectional = engine.vision.bidirectional
    tokens, placed = image_prompt(engine, [png(30, SIZES[1])], [[5, 6], [7]])
    key, split = placed[0][0], 20
    pager = SeqPager(engine)
    first = pager.request(0, tokens[:split], [OutputSpec(0, Sampler())], images=[(key, 2)])
    if bidirectional:
        with pytest.raises(BatchError, match="split between passes"):
            engine.forward_batch(ForwardBatch([first]))
        return
    engine.forward_batch(ForwardBatch([first]))
    rest = pager.request(0, tokens[split:], [OutputSpec(len(tokens) - split - 1, probe=Probe("logits"))],
                         images=[(key, 2 - split)])
    (row,), = engine.forward_batch(ForwardBatch([rest])).outputs
    whole = engine_greedy(engine, tokens, placed, 1)[1][0]
    np.testing.assert_allclose(logits_of(row), whole, atol=1e-5)  # type: ignore[arg-type]
