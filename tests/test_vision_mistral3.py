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
from engine_helpers import SeqPager, logits_of, make_engine
from test_vision_pixtral import PREPROCESSOR, _config, _spread
from vision_support import png

from pie.engine.batch import ForwardBatch, OutputSpec, Probe, Sampler
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


def _greedy_ours(engine: Engine, images: list[bytes], text: list[list[int]],
                 steps: int) -> tuple[list[int], list[np.ndarray], list[int]]:
    tokens, placed = list(text[0]), []
    for data, after in zip(images, text[1:], strict=True):
        info = engine.prepare_image(data)
        placed.append((info.key, len(tokens)))
        tokens += info.tokens + after
    pager = SeqPager(engine)
    out: list[int] = []
    logits: list[np.ndarray] = []
    feed, imgs = tokens, placed
    for _ in range(steps):
        req = pager.request(0, feed, [OutputSpec(len(feed) - 1, Sampler("argmax")),
                                      OutputSpec(len(feed) - 1, probe=Probe("logits"))], images=imgs)
        tok, row = engine.forward_batch(ForwardBatch([req])).outputs[0]
        out.append(int(tok))  # type: ignore[arg-type]
        logits.append(logits_of(row))  # type: ignore[arg-type]
        feed, imgs = [out[-1]], None
    return out, logits, tokens


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
    ours, our_logits, tokens = _greedy_ours(engine, images, text, 16)
    theirs, their_logits = _greedy_theirs(engine, reference, tokens, images, 16)
    assert ours == theirs
    np.testing.assert_allclose(np.stack(our_logits), np.stack(their_logits), atol=2e-4, rtol=1e-4)


def test_the_image_changes_the_output(engine: Engine) -> None:
    a = _greedy_ours(engine, [png(60, (30, 22))], [[5, 6], [7]], 1)
    b = _greedy_ours(engine, [png(61, (30, 22))], [[5, 6], [7]], 1)
    assert a[2] == b[2] and np.abs(a[1][0] - b[1][0]).max() > 1e-3
