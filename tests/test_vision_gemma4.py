"""Gemma 4's vision tower and image processor against transformers (tiny random, float32, CPU).

The reference image processor is transformers' `Gemma4ImageProcessorPil` (Pillow backend; the
torchvision one is not installed here); the token layout is the processor's rule
(`<boi>`, one image token per pooled block, `<eoi>`), checked through transformers' own forward.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Gemma4ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
from vision_support import (
    GEMMA4_BOI,
    GEMMA4_EOI,
    GEMMA4_IMAGE,
    GEMMA4_PREPROCESSOR,
    gemma4_config,
    gemma4_model,
)

from pie.engine.vision.gemma4 import Gemma4ImageProcessor, Gemma4VisionTower

PREPROCESSOR = GEMMA4_PREPROCESSOR
IMAGE, BOI, EOI = GEMMA4_IMAGE, GEMMA4_BOI, GEMMA4_EOI
TEXT_HIDDEN = 64


@pytest.fixture(scope="module")
def hf_model() -> Gemma4ForConditionalGeneration:
    return gemma4_model()


@pytest.fixture(scope="module")
def tower(hf_model: Gemma4ForConditionalGeneration) -> Gemma4VisionTower:
    tower = Gemma4VisionTower.from_config(hf_model.config, torch.float32, torch.device("cpu"))
    consumed = [n for n, t in hf_model.state_dict().items() if tower.load_tensor(n, t)]
    assert consumed and all(n.startswith(("model.vision_tower.", "model.embed_vision.")) for n in consumed)
    tower.check_loaded()
    return tower


def _image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _reference(img: Image.Image) -> dict[str, Any]:
    kw = {k: v for k, v in PREPROCESSOR.items() if k != "image_processor_type"}
    return dict(Gemma4ImageProcessorPil(**kw)(images=[img], return_tensors="pt"))


@pytest.mark.parametrize("size", [(50, 30), (13, 22), (300, 20), (32, 24), (1, 1), (400, 3)])
def test_pixels_and_tokens_match_gemma4_image_processor(size: tuple[int, int]) -> None:
    img = _image(*size, seed=size[0])
    prep = Gemma4ImageProcessor(PREPROCESSOR, gemma4_config()).prepare(img)
    ref = _reference(img)
    n_patches = prep.grid[1] * prep.grid[2]
    torch.testing.assert_close(prep.pixel_values, ref["pixel_values"][0, :n_patches], atol=1e-6, rtol=0)
    assert (ref["image_position_ids"][0, n_patches:] == -1).all()  # the rest is padding
    positions = ref["image_position_ids"][0, :n_patches]  # (x, y): row-major patches
    assert positions[:, 0].max() + 1 == prep.grid[2] and positions[:, 1].max() + 1 == prep.grid[1]
    n = int(ref["num_soft_tokens_per_image"][0])
    assert prep.tokens == [BOI, *[IMAGE] * n, EOI] and prep.embed_rows == list(range(1, n + 1))


def test_embeddings_of_two_images_match_get_image_features(
        hf_model: Gemma4ForConditionalGeneration, tower: Gemma4VisionTower) -> None:
    proc = Gemma4ImageProcessor(PREPROCESSOR, hf_model.config)
    images = [_image(50, 30, seed=1), _image(17, 41, seed=2)]
    prepared = [proc.prepare(i) for i in images]
    assert prepared[0].grid != prepared[1].grid
    ours = tower(prepared)
    refs = [_reference(i) for i in images]
    with torch.no_grad():
        ref = hf_model.model.get_image_features(
            pixel_values=torch.cat([r["pixel_values"] for r in refs]),
            image_position_ids=torch.cat([r["image_position_ids"] for r in refs])).pooler_output
    for mine, theirs, p in zip(ours, ref, prepared, strict=True):
        assert mine.shape == (len(p.embed_rows), TEXT_HIDDEN)
        assert (mine - theirs).abs().max() / theirs.abs().max() < 1e-4
    torch.testing.assert_close(tower(prepared[1:])[0], ours[1], atol=1e-5, rtol=1e-5)


def test_bfloat16_tower_is_as_close_to_float32_as_transformers_bfloat16(
        hf_model: Gemma4ForConditionalGeneration, tower: Gemma4VisionTower) -> None:
    """The clamps and the standardisation make bfloat16 drift (5% in transformers too on these weights)."""
    half = Gemma4VisionTower.from_config(hf_model.config, torch.bfloat16, torch.device("cpu"))
    for name, t in hf_model.state_dict().items():
        half.load_tensor(name, t)
    half.check_loaded()
    img = _image(30, 30, seed=9)
    low = half([Gemma4ImageProcessor(PREPROCESSOR, hf_model.config).prepare(img)])[0]
    assert low.dtype == torch.bfloat16
    ref = _reference(img)
    with torch.no_grad():
        full = hf_model.model.get_image_features(pixel_values=ref["pixel_values"],
                                                 image_position_ids=ref["image_position_ids"]).pooler_output[0]
        hf_low = copy.deepcopy(hf_model).to(torch.bfloat16).model.get_image_features(
            pixel_values=ref["pixel_values"].bfloat16(), image_position_ids=ref["image_position_ids"]).pooler_output[0]
    ours_err = (low.float() - full).abs().max() / full.abs().max()
    theirs_err = (hf_low.float() - full).abs().max() / full.abs().max()
    assert ours_err < 1.5 * theirs_err + 1e-2, (float(ours_err), float(theirs_err))


def test_prepared_image_in_transformers_prompt_gives_its_logits(
        hf_model: Gemma4ForConditionalGeneration, tower: Gemma4VisionTower) -> None:
    """Our tokens around our embeddings, in transformers' own forward, give the logits of its pixel path."""
    img = _image(40, 28, seed=4)
    prep = Gemma4ImageProcessor(PREPROCESSOR, hf_model.config).prepare(img)
    ids = torch.tensor([[2, 5, *prep.tokens, 6, 7]])
    types = (ids == IMAGE).long()
    ref = _reference(img)
    with torch.no_grad():
        theirs = hf_model(input_ids=ids, pixel_values=ref["pixel_values"], mm_token_type_ids=types,
                          image_position_ids=ref["image_position_ids"]).logits
        ours = hf_model(input_ids=ids, mm_token_type_ids=types, mm_encoder_outputs={
            "image": BaseModelOutputWithPooling(pooler_output=tuple(tower([prep])))}).logits
    assert (ours - theirs).abs().max() / theirs.abs().max() < 1e-4
