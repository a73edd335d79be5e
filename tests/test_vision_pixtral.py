"""Mistral 3's Pixtral tower and processor against transformers on a tiny random checkpoint (float32, CPU).

The reference image processor is transformers' `PixtralImageProcessorPil` (the Pillow backend: the
torchvision one, and `PixtralProcessor` whose module imports torchvision, are not installed here);
the token layout is checked against the processor's documented rule and, through transformers'
own model, against the placeholder positions its forward fills.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Mistral3Config, Mistral3ForConditionalGeneration
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

from pie.engine.vision.common import PreparedImage
from pie.engine.vision.pixtral import PixtralImageProcessor, PixtralVisionTower

IMG, BREAK, END = 10, 12, 13
PATCH, MERGE, LONGEST = 4, 2, 40
PREPROCESSOR: dict[str, Any] = {  # the keys of a real preprocessor_config.json, tiny sizes
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "PixtralImageProcessor", "patch_size": {"height": PATCH, "width": PATCH},
    "resample": 3, "rescale_factor": 1 / 255, "size": {"longest_edge": LONGEST},
}


def _config() -> Mistral3Config:
    vision = {"model_type": "pixtral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "patch_size": PATCH, "image_size": LONGEST, "hidden_act": "silu",
              "rope_parameters": {"rope_type": "axial", "rope_theta": 10_000.0}}
    text = {"model_type": "mistral", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 12, "vocab_size": 64,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 512}
    return Mistral3Config(vision_config=vision, text_config=text, image_token_index=IMG,
                          spatial_merge_size=MERGE, multimodal_projector_bias=True)


@pytest.fixture(scope="module")
def hf_model() -> Mistral3ForConditionalGeneration:
    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(_config()).eval()
    _spread(model)
    return model


def _spread(model: torch.nn.Module) -> None:
    """Weights of unit gain (queries and keys of more), norms and biases off their init values.

    With the default 0.02 init the attention is almost uniform and the rotary embedding barely
    matters; these weights make every part of the tower show in the output.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
            elif p.ndim >= 2:
                gain = 3.0 if ("q_proj" in name or "k_proj" in name or "qkv" in name) else 1.0
                p.normal_(0.0, gain / p[0].numel() ** 0.5)


@pytest.fixture(scope="module")
def tower(hf_model: Mistral3ForConditionalGeneration) -> PixtralVisionTower:
    tower = PixtralVisionTower.from_config(hf_model.config, torch.float32, torch.device("cpu"))
    consumed = [name for name, t in hf_model.state_dict().items() if tower.load_tensor(name, t)]
    assert consumed and all("vision_tower" in n or "multi_modal_projector" in n for n in consumed)
    tower.check_loaded()
    return tower


def _image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, len(mode)), dtype=np.uint8), mode)


def _hf_pixels(img: Image.Image) -> tuple[torch.Tensor, list[int]]:
    # what PixtralProcessor asks of its image processor: patches of patch_size * spatial_merge_size
    ref = PixtralImageProcessorPil(**{k: v for k, v in PREPROCESSOR.items() if k != "image_processor_type"})
    out = ref(images=[img], patch_size={"height": PATCH * MERGE, "width": PATCH * MERGE}, return_tensors="pt")
    return out["pixel_values"][0], [int(x) for x in out["image_sizes"][0]]


@pytest.mark.parametrize("size", [(50, 30), (13, 22), (40, 40)])
def test_pixels_and_layout_match_the_pixtral_processor(size: tuple[int, int]) -> None:
    img = _image(*size, seed=size[0])
    prep = PixtralImageProcessor(PREPROCESSOR, _config()).prepare(img)
    ref_pixels, (height, width) = _hf_pixels(img)
    assert tuple(prep.pixel_values.shape) == (3, height, width)
    torch.testing.assert_close(prep.pixel_values, ref_pixels, atol=1e-6, rtol=0)
    rows, cols = height // (PATCH * MERGE), width // (PATCH * MERGE)
    assert prep.grid == (1, height // PATCH, width // PATCH)
    expected = ([IMG] * cols + [BREAK]) * rows
    expected[-1] = END
    assert prep.tokens == expected
    assert prep.embed_rows == [i for i, t in enumerate(expected) if t == IMG]
    assert prep.positions is None and prep.position_span == len(expected)


def test_transparency_is_composited_on_white_like_transformers() -> None:
    img = _image(20, 12, seed=3, mode="RGBA")
    prep = PixtralImageProcessor(PREPROCESSOR, _config()).prepare(img)
    torch.testing.assert_close(prep.pixel_values, _hf_pixels(img)[0], atol=1e-6, rtol=0)


def test_embeddings_of_two_images_match_get_image_features(
        hf_model: Mistral3ForConditionalGeneration, tower: PixtralVisionTower) -> None:
    proc = PixtralImageProcessor(PREPROCESSOR, hf_model.config)
    images = [_image(50, 30, seed=1), _image(17, 33, seed=2)]
    prepared = [proc.prepare(i) for i in images]
    assert prepared[0].grid != prepared[1].grid
    ours = tower(prepared)
    # transformers' batch: padded to the largest image, with the true sizes beside it
    pixels = torch.zeros(2, 3, max(p.pixel_values.shape[1] for p in prepared),
                         max(p.pixel_values.shape[2] for p in prepared))
    for i, p in enumerate(prepared):
        pixels[i, :, :p.pixel_values.shape[1], :p.pixel_values.shape[2]] = p.pixel_values
    sizes = torch.tensor([list(p.pixel_values.shape[1:]) for p in prepared])
    with torch.no_grad():
        ref = hf_model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
    for mine, theirs, p in zip(ours, ref, prepared, strict=True):
        assert mine.shape == (len(p.embed_rows), 48)
        err = (mine - theirs).abs().max() / theirs.abs().max()
        assert err < 1e-4, float(err)
    # alone, an image gets the same embeddings as in company (attention stays within an image)
    torch.testing.assert_close(tower(prepared[1:])[0], ours[1], atol=1e-5, rtol=1e-5)


def test_embed_rows_are_where_transformers_puts_the_image(
        hf_model: Mistral3ForConditionalGeneration, tower: PixtralVisionTower) -> None:
    """Logits of transformers' own image prompt == its text model fed our embeddings at embed_rows."""
    prep: PreparedImage = PixtralImageProcessor(PREPROCESSOR, hf_model.config).prepare(_image(30, 20, seed=5))
    ids = torch.tensor([[1, 20, 21, *prep.tokens, 22, 23]])
    with torch.no_grad():
        ref = hf_model(input_ids=ids, pixel_values=prep.pixel_values[None],
                       image_sizes=torch.tensor([list(prep.pixel_values.shape[1:])])).logits
        embeds = hf_model.get_input_embeddings()(ids)
        embeds[0, torch.tensor(prep.embed_rows) + 3] = tower([prep])[0]
        ours = hf_model(inputs_embeds=embeds).logits
    assert (ours - ref).abs().max() / ref.abs().max() < 1e-4


def test_tensor_names_of_older_checkpoints_load_too(hf_model: Mistral3ForConditionalGeneration) -> None:
    tower = PixtralVisionTower.from_config(hf_model.config, torch.float32, torch.device("cpu"))
    for name, t in hf_model.state_dict().items():
        tower.load_tensor(name.removeprefix("model."), t)  # "vision_tower.", "multi_modal_projector."
    tower.check_loaded()
    assert not tower.load_tensor("language_model.model.embed_tokens.weight", torch.zeros(1))
    with pytest.raises(ValueError, match="shape"):
        tower.load_tensor("vision_tower.ln_pre.weight", torch.zeros(3))
    fresh = PixtralVisionTower.from_config(hf_model.config, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="not in the checkpoint"):
        fresh.check_loaded()


def test_bfloat16_tower_runs_close_to_float32(
        hf_model: Mistral3ForConditionalGeneration, tower: PixtralVisionTower) -> None:
    half = PixtralVisionTower.from_config(hf_model.config, torch.bfloat16, torch.device("cpu"))
    for name, t in hf_model.state_dict().items():
        half.load_tensor(name, t)
    half.check_loaded()
    prep = [PixtralImageProcessor(PREPROCESSOR, hf_model.config).prepare(_image(30, 30, seed=9))]
    low, full = half(prep)[0], tower(prep)[0]
    assert low.dtype == torch.bfloat16
    assert (low.float() - full).abs().max() / full.abs().max() < 5e-2
