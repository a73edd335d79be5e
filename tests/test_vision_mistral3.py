"""Mistral 3 with images through the engine: the Pixtral tower (`pie.engine.vision.pixtral`) plugged into the
engine's image path, against transformers on a tiny random Mistral3ForConditionalGeneration (float32):
prefill logits and 16 greedy steps with one image, and with two images of different sizes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from engine_helpers import make_engine
from test_vision_pixtral import PREPROCESSOR, _config, _spread
from vision_support import engine_greedy, image_prompt, png

from pie.engine.engine import Engine
from pie.tiny_model import write_tokenizer_files


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import Mistral3ForConditionalGeneration

    directory = tmp_path_factory.mktemp("mistral3-vision")
    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(_config()).eval()
    _spread(model)
    model.save_pretrained(directory, safe_serialization=True)
    write_tokenizer_files(directory, 64)
    (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return directory


@pytest.fixture(scope="module")
def engine(ckpt: Path) -> Engine:
    return make_engine(ckpt, max_num_embeds=64, activation_dtype="float32")


@pytest.fixture(scope="module")
def reference(ckpt: Path) -> Any:
    from transformers import Mistral3ForConditionalGeneration

    return Mistral3ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()


def _greedy_theirs(engine: Engine, model: Any, tokens: list[int], images: list[bytes],
                   steps: int) -> tuple[list[int], list[np.ndarray]]:
    assert engine.vision is not None
    prepared = [engine.vision.store.get(engine.prepare_image(d).key) for d in images]
    pixels = [p.image.pixel_values for p in prepared if p is not None]
    h, w = max(p.shape[1] for p in pixels), max(p.shape[2] for p in pixels)  # transformers pads the batch
    batch = torch.zeros(len(pixels), 3, h, w)
    for i, p in enumerate(pixels):
        batch[i, :, :p.shape[1], :p.shape[2]] = p
    ids = torch.tensor([tokens])
    with torch.no_grad():
        res = model.generate(ids, attention_mask=torch.ones_like(ids), pixel_values=batch,
                             image_sizes=torch.tensor([[p.shape[1], p.shape[2]] for p in pixels]),
                             max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0,
                             eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    return res.sequences[0, len(tokens):].tolist(), [s[0].float().numpy() for s in res.logits]


@pytest.mark.parametrize("sizes", [[(30, 22)], [(30, 22), (17, 40)]])
def test_prefill_and_greedy_with_images_equal_transformers(engine: Engine, reference: Any,
                                                           sizes: list[tuple[int, int]]) -> None:
    images = [png(50 + i, size) for i, size in enumerate(sizes)]
    text = [[5, 17, 33], [40, 41], [7, 8, 9]][: len(images) + 1]
    tokens, placed = image_prompt(engine, images, text)
    ours, our_logits = engine_greedy(engine, tokens, placed, 16)
    theirs, their_logits = _greedy_theirs(engine, reference, tokens, images, 16)
    assert ours == theirs
    np.testing.assert_allclose(np.stack(our_logits), np.stack(their_logits), atol=2e-4, rtol=1e-4)


def test_the_image_changes_the_output(engine: Engine) -> None:
    a, pa = image_prompt(engine, [png(60, (30, 22))], [[5, 6], [7]])
    b, pb = image_prompt(engine, [png(61, (30, 22))], [[5, 6], [7]])
    assert a == b
    la, lb = engine_greedy(engine, a, pa, 1)[1][0], engine_greedy(engine, b, pb, 1)[1][0]
    assert np.abs(la - lb).max() > 1e-3
