"""Qwen3-VL and Qwen 3.5 (dense and MoE each) with images through the engine, against transformers.

Tiny random Qwen3VLForConditionalGeneration / Qwen3VLMoeForConditionalGeneration /
Qwen3_5ForConditionalGeneration / Qwen3_5MoeForConditionalGeneration checkpoints (transformers' own config and model classes, a 3-block
vision tower with two DeepStack levels on Qwen3-VL, none on Qwen 3.5) in float32: the engine's image
embeddings, prefill logits and 16 greedy steps with one image and with two images of different
grids equal transformers' `generate` on the same pixels (its M-RoPE positions from `get_rope_index`,
its DeepStack additions). The prompt's 1-D positions follow the images' `position_offsets`, so the
text after an image sits at start + position_span, as transformers places it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from engine_helpers import SeqPager, make_engine
from test_vision_qwen3_vl import END, IMAGE, PREPROCESSOR, START, VISION, _spread
from vision_support import engine_greedy, image_positions_1d, image_prompt, png

from pie.engine.batch import ForwardBatch, OutputSpec, Sampler
from pie.engine.engine import Engine
from pie.errors import BatchError
from pie.tiny_model import write_tokenizer_files

VOCAB = 64
FAMILIES = ["qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"]
_ROPE = {"rope_type": "default", "rope_theta": 10_000.0, "mrope_interleaved": True}


def qwen_vl_config(family: str) -> Any:
    from transformers import Qwen3_5Config, Qwen3_5MoeConfig, Qwen3VLConfig, Qwen3VLMoeConfig

    text: dict[str, Any] = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 12, "vocab_size": VOCAB,
                            "max_position_embeddings": 512, "rope_parameters": {**_ROPE, "mrope_section": [2, 2, 2]}}
    ids = {"image_token_id": IMAGE, "vision_start_token_id": START, "vision_end_token_id": END,
           "tie_word_embeddings": False}
    deepstack = {**VISION, "deepstack_visual_indexes": [0, 1]}
    if family == "qwen3_vl":
        return Qwen3VLConfig(vision_config=deepstack, text_config=text, **ids)
    if family == "qwen3_vl_moe":
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
        return Qwen3VLMoeConfig(vision_config=deepstack, text_config=text, **ids)
    # Qwen 3.5: gated-delta layers 0-2, attention at 3, partial rotary (half of head_dim 16: 4 frequencies)
    text.update(num_hidden_layers=4, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4,
                layer_types=["linear_attention"] * 3 + ["full_attention"],
                rope_parameters={**_ROPE, "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1]})
    if family == "qwen3_5_moe":
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                    shared_expert_intermediate_size=24)
        return Qwen3_5MoeConfig(vision_config=VISION, text_config=text, **ids)
    return Qwen3_5Config(vision_config=VISION, text_config=text, **ids)


def qwen_vl_checkpoint(directory: Path, family: str, seed: int = 0) -> Path:
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(qwen_vl_config(family), dtype=torch.float32).eval()
    _spread(model.model.visual)
    with torch.no_grad():  # norms off 1 so the comparison sees them
        for name, p in model.named_parameters():
            if p.ndim == 1 and not name.startswith("model.visual."):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory, safe_serialization=True)
    write_tokenizer_files(directory, VOCAB)
    (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return directory


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Engine, Any]:
    from transformers import AutoModelForImageTextToText

    d = qwen_vl_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    ref = AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    assert ref.config.model_type == request.param
    return make_engine(d, max_num_embeds=64, activation_dtype="float32", kv_page_size=8), ref


def _prepared(engine: Engine, images: list[bytes]) -> list[Any]:
    assert engine.vision is not None
    entries = [engine.vision.store.get(engine.prepare_image(d).key) for d in images]
    return [e.image for e in entries if e is not None]


def _hf_greedy(model: Any, engine: Engine, tokens: list[int], images: list[bytes],
               steps: int) -> tuple[list[int], list[np.ndarray]]:
    prepared = _prepared(engine, images)
    ids = torch.tensor([tokens])
    with torch.no_grad():
        res = model.generate(ids, attention_mask=torch.ones_like(ids),
                             pixel_values=torch.cat([p.pixel_values for p in prepared]),
                             image_grid_thw=torch.tensor([list(p.grid) for p in prepared]),
                             mm_token_type_ids=(ids == IMAGE).int(), max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True,
                             return_dict_in_generate=True)
    return res.sequences[0, len(tokens):].tolist(), [s[0].float().numpy() for s in res.logits]


def test_image_embeddings_equal_transformers(family: tuple[Engine, Any]) -> None:
    engine, ref = family
    data = [png(1, (50, 30)), png(2, (17, 41))]
    prepared = _prepared(engine, data)
    assert engine.vision is not None
    ours = engine.vision.encoded([engine.prepare_image(d).key for d in data])
    with torch.no_grad():
        theirs = ref.model.get_image_features(pixel_values=torch.cat([p.pixel_values for p in prepared]),
                                              image_grid_thw=torch.tensor([list(p.grid) for p in prepared]))
    levels = 0 if ref.config.model_type.startswith("qwen3_5") else 2
    for i, mine in enumerate(ours.values()):
        torch.testing.assert_close(mine.embeds, theirs.pooler_output[i], atol=1e-4, rtol=1e-4)
        assert len(mine.deepstack) == levels
        for k in range(levels):
            torch.testing.assert_close(mine.deepstack[k], theirs.deepstack_features[k][i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sizes", [[(50, 30)], [(50, 30), (17, 41)]])
def test_prefill_and_greedy_with_images_equal_transformers(family: tuple[Engine, Any],
                                                           sizes: list[tuple[int, int]]) -> None:
    engine, ref = family
    images = [png(50 + i, size) for i, size in enumerate(sizes)]
    text = [[5, 17, 33], [40, 41], [7, 8, 9]][: len(images) + 1]
    tokens, placed = image_prompt(engine, images, text)
    positions = image_positions_1d(engine, len(tokens), placed)
    assert positions[-1] + 1 < len(tokens)  # the images take fewer positions than tokens
    ours, our_logits = engine_greedy(engine, tokens, placed, 16)
    theirs, their_logits = _hf_greedy(ref, engine, tokens, images, 16)
    assert ours == theirs
    np.testing.assert_allclose(np.stack(our_logits), np.stack(their_logits), atol=2e-4, rtol=1e-4)


def test_image_rows_off_their_offsets_are_batch_errors(family: tuple[Engine, Any]) -> None:
    """Image tokens at slot positions (not start + position_offsets) would run with other M-RoPE
    positions than the image's: refused, naming the request."""
    engine, _ = family
    tokens, placed = image_prompt(engine, [png(70, (50, 30))], [[5, 6], [7]])
    req = SeqPager(engine).request(0, tokens, [OutputSpec(len(tokens) - 1, Sampler())], images=placed,
                                   state_slot=0 if engine.states is not None else None)
    with pytest.raises(BatchError, match="request 0: the positions of image"):
        engine.forward_batch(ForwardBatch([req]))
