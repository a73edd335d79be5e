"""Qwen3-VL's and Qwen 3.5's vision towers and image processor against transformers (tiny random, float32, CPU).

The reference image processor is transformers' `Qwen2VLImageProcessorPil` (what Qwen3-VL's processor
uses, Pillow backend; the torchvision backend is not installed here); positions against
`Qwen3VLModel.get_rope_index`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5Config
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel

from pie.engine.vision.common import ImageInputError
from pie.engine.vision.qwen3_vl import (
    Qwen3VLImageProcessor,
    Qwen3VLVisionTower,
    prompt_positions,
    smart_resize,
)

PATCH, MERGE, TEMPORAL = 4, 2, 2
IMAGE, START, END = 60, 61, 62
PREPROCESSOR: dict[str, Any] = {  # the keys of Qwen3-VL's preprocessor_config.json, tiny sizes
    "size": {"longest_edge": 48 * 48, "shortest_edge": 16 * 16}, "patch_size": PATCH,
    "temporal_patch_size": TEMPORAL, "merge_size": MERGE, "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5], "do_rescale": True, "rescale_factor": 1 / 255, "resample": 3,
    "image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen3VLProcessor",
}
VISION: dict[str, Any] = {"depth": 3, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                          "patch_size": PATCH, "temporal_patch_size": TEMPORAL, "spatial_merge_size": MERGE,
                          "out_hidden_size": 48, "num_position_embeddings": 25, "hidden_act": "gelu_pytorch_tanh"}


def _spread(model: torch.nn.Module) -> None:
    """Unit-gain weights (queries and keys more), norms and biases off their init: every part shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
            elif p.ndim >= 2:
                p.normal_(0.0, (3.0 if "qkv" in name else 1.0) / p[0].numel() ** 0.5)


def _qwen3_vl_config() -> Qwen3VLConfig:
    text = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 12, "vocab_size": 64, "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0, "mrope_section": [2, 2, 2],
                                "mrope_interleaved": True}}
    return Qwen3VLConfig(vision_config={**VISION, "deepstack_visual_indexes": [0, 1]}, text_config=text,
                         image_token_id=IMAGE, vision_start_token_id=START, vision_end_token_id=END)


@pytest.fixture(scope="module")
def hf_model() -> Qwen3VLForConditionalGeneration:
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(_qwen3_vl_config()).eval()
    _spread(model)
    return model


def _image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _reference_processor() -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(**{k: v for k, v in PREPROCESSOR.items()
                                       if k not in ("image_processor_type", "processor_class")})


@pytest.mark.parametrize("size", [(50, 30), (13, 22), (90, 7), (100, 100), (9, 9)])
def test_pixels_and_grid_match_qwen2vl_image_processor(size: tuple[int, int]) -> None:
    img = _image(*size, seed=size[0])
    prep = Qwen3VLImageProcessor(PREPROCESSOR, _qwen3_vl_config()).prepare(img)
    ref = _reference_processor()(images=[img], return_tensors="pt")
    assert list(prep.grid) == ref["image_grid_thw"][0].tolist()
    torch.testing.assert_close(prep.pixel_values, ref["pixel_values"], atol=1e-6, rtol=0)
    n = prep.grid[1] * prep.grid[2] // MERGE ** 2
    assert prep.tokens == [START, *[IMAGE] * n, END]
    assert prep.embed_rows == list(range(1, n + 1))


def test_smart_resize_refuses_what_transformers_refuses() -> None:
    assert smart_resize(30, 50, 8, 16 * 16, 48 * 48) == (32, 48)
    with pytest.raises(ImageInputError, match="aspect ratio"):
        Qwen3VLImageProcessor(PREPROCESSOR, _qwen3_vl_config()).prepare(_image(402, 2, seed=0))


def _two_image_prompt(proc: Qwen3VLImageProcessor) -> tuple[list[Any], list[int]]:
    first, second = proc.prepare(_image(50, 30, seed=1)), proc.prepare(_image(17, 41, seed=2))
    parts: list[Any] = [[1, 2, 3], first, [4], second, [5, 6]]
    ids = [t for part in parts for t in (part if isinstance(part, list) else part.tokens)]
    return parts, ids


def test_positions_match_get_rope_index(hf_model: Qwen3VLForConditionalGeneration) -> None:
    parts, ids = _two_image_prompt(Qwen3VLImageProcessor(PREPROCESSOR, hf_model.config))
    grids = torch.tensor([list(p.grid) for p in parts if not isinstance(p, list)])
    ref, _ = hf_model.model.get_rope_index(torch.tensor([ids]), image_grid_thw=grids,
                                           mm_token_type_ids=torch.tensor([[int(t == IMAGE) for t in ids]]))
    ours, next_pos = prompt_positions(parts, start=0)
    torch.testing.assert_close(ours, ref[:, 0])
    assert next_pos == int(ref.max()) + 1 < len(ids)  # images take fewer positions than tokens


@pytest.fixture(scope="module")
def tower(hf_model: Qwen3VLForConditionalGeneration) -> Qwen3VLVisionTower:
    tower = Qwen3VLVisionTower.from_config(hf_model.config, torch.float32, torch.device("cpu"))
    consumed = [n for n, t in hf_model.state_dict().items() if tower.load_tensor(n, t)]
    assert consumed and all(n.startswith("model.visual.") for n in consumed)
    tower.check_loaded()
    return tower


def test_embeddings_and_deepstack_of_two_images_match_get_image_features(
        hf_model: Qwen3VLForConditionalGeneration, tower: Qwen3VLVisionTower) -> None:
    proc = Qwen3VLImageProcessor(PREPROCESSOR, hf_model.config)
    prepared = [proc.prepare(_image(50, 30, seed=1)), proc.prepare(_image(17, 41, seed=2))]
    assert prepared[0].grid != prepared[1].grid
    ours = tower.embed_images(prepared)
    with torch.no_grad():
        ref = hf_model.model.get_image_features(
            pixel_values=torch.cat([p.pixel_values for p in prepared]),
            image_grid_thw=torch.tensor([list(p.grid) for p in prepared]))
    for i, (mine, p) in enumerate(zip(ours, prepared, strict=True)):
        pairs = [(mine.embeds, ref.pooler_output[i])] + [
            (d, layer[i]) for d, layer in zip(mine.deepstack, ref.deepstack_features, strict=True)]
        assert len(pairs) == 3 and mine.embeds.shape == (len(p.embed_rows), 48)
        for a, b in pairs:
            assert (a - b).abs().max() / b.abs().max() < 1e-4
    torch.testing.assert_close(tower(prepared[1:])[0], ours[1].embeds, atol=1e-5, rtol=1e-5)


def test_qwen3_5_tower_without_deepstack_matches_transformers() -> None:
    torch.manual_seed(1)
    config = Qwen3_5Config(vision_config=VISION, image_token_id=IMAGE, vision_start_token_id=START,
                           vision_end_token_id=END,
                           text_config={"hidden_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
                                        "num_key_value_heads": 2, "head_dim": 12, "vocab_size": 64})
    ref_model = Qwen3_5VisionModel(config.vision_config).eval()
    _spread(ref_model)
    tower = Qwen3VLVisionTower.from_config(config, torch.float32, torch.device("cpu"))
    for name, t in ref_model.state_dict().items():
        assert tower.load_tensor("visual." + name, t)  # the older prefix
    tower.check_loaded()
    prepared = [Qwen3VLImageProcessor(PREPROCESSOR, config).prepare(_image(w, h, seed=w)) for w, h in
                [(33, 20), (20, 44)]]
    ours = tower.embed_images(prepared)
    with torch.no_grad():
        ref = ref_model(torch.cat([p.pixel_values for p in prepared]),
                        grid_thw=torch.tensor([list(p.grid) for p in prepared])).pooler_output
    for mine, theirs in zip(ours, ref.split([len(p.embed_rows) for p in prepared]), strict=True):
        assert mine.deepstack == ()
        assert (mine.embeds - theirs).abs().max() / theirs.abs().max() < 1e-4


def test_prepared_images_reproduce_transformers_multimodal_forward(
        hf_model: Qwen3VLForConditionalGeneration, tower: Qwen3VLVisionTower) -> None:
    """Tokens, embed_rows, positions and DeepStack matrices, fed to transformers' text model, give the
    logits of transformers' own forward over pixel_values: the contract the engine builds on."""
    parts, ids = _two_image_prompt(Qwen3VLImageProcessor(PREPROCESSOR, hf_model.config))
    images = [p for p in parts if not isinstance(p, list)]
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        ref = hf_model(input_ids=ids_t, pixel_values=torch.cat([p.pixel_values for p in images]),
                       image_grid_thw=torch.tensor([list(p.grid) for p in images]),
                       mm_token_type_ids=torch.tensor([[int(t == IMAGE) for t in ids]])).logits
        encoded = tower.embed_images(images)
        embeds = hf_model.get_input_embeddings()(ids_t)
        rows, start = [], 0
        for part in parts:
            if not isinstance(part, list):
                rows += [start + r for r in part.embed_rows]
            start += len(part if isinstance(part, list) else part.tokens)
        embeds[0, rows] = torch.cat([e.embeds for e in encoded])
        mask = torch.zeros(1, len(ids), dtype=torch.bool)
        mask[0, rows] = True
        deep = [torch.cat([e.deepstack[k] for e in encoded]) for k in range(2)]
        hidden = hf_model.model.language_model(inputs_embeds=embeds, position_ids=prompt_positions(parts)[0][:, None],
                                               visual_pos_masks=mask, deepstack_visual_embeds=deep).last_hidden_state
        ours = hf_model.lm_head(hidden)
    assert (ours - ref).abs().max() / ref.abs().max() < 1e-4


def test_bfloat16_tower_runs_close_to_float32(
        hf_model: Qwen3VLForConditionalGeneration, tower: Qwen3VLVisionTower) -> None:
    half = Qwen3VLVisionTower.from_config(hf_model.config, torch.bfloat16, torch.device("cpu"))
    for name, t in hf_model.state_dict().items():
        half.load_tensor(name, t)
    half.check_loaded()
    prep = [Qwen3VLImageProcessor(PREPROCESSOR, hf_model.config).prepare(_image(30, 30, seed=9))]
    low, full = half(prep)[0], tower(prep)[0]
    assert low.dtype == torch.bfloat16
    assert (low.float() - full).abs().max() / full.abs().max() < 5e-2
