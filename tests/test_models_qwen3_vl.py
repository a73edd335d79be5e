"""Qwen3-VL's text decoders (dense and MoE) against transformers on a tiny random checkpoint (float32, CPU).

Text-only prompts through the engine (logits of every row, greedy steps); a prompt with image tokens
through the model with M-RoPE positions and DeepStack additions, against transformers' text model
given the same 3-D positions and DeepStack embeddings.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from checkpoints import VOCAB
from engine_helpers import (
    all_row_logits,
    greedy_generate,
    hf_greedy,
    hf_logits,
    make_engine,
    random_prompts,
    rel_err,
)
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, Qwen3VLConfig, Qwen3VLMoeConfig

from pie.engine.attention.base import AttentionShape, BatchLayout, create_backend
from pie.engine.forward_context import ForwardContext
from pie.engine.kv_cache import KVCache, KVShape
from pie.engine.layers.rotary import Rotary, rope_inv_freq
from pie.engine.loader import build_model, checkpoint_files, load_weights
from pie.engine.models.qwen3_vl import DEEPSTACK, MROPE_POSITIONS, DeepstackRows, MRopeDeepstack, MRotary
from pie.engine.models.registry import get_architecture
from pie.engine.vision.qwen3_vl import image_positions
from pie.tiny_model import write_tokenizer_files

IMAGE, START, END = 500, 501, 502
TOL = 1e-4


def _config(model_type: str = "qwen3_vl") -> Any:
    text: dict[str, Any] = {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": VOCAB, "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0, "mrope_section": [2, 3, 3],
                            "mrope_interleaved": True}}
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 4,
              "out_hidden_size": 64, "num_position_embeddings": 16, "deepstack_visual_indexes": [0]}
    cls: Any = Qwen3VLConfig
    if model_type == "qwen3_vl_moe":
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)  # 2I != hidden
        cls = Qwen3VLMoeConfig
    return cls(text_config=text, vision_config=vision, image_token_id=IMAGE, vision_start_token_id=START,
               vision_end_token_id=END, tie_word_embeddings=False)


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen3_vl_moe"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    d = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(_config(request.param)).eval()
    assert type(model).__name__.lower().startswith(request.param.replace("_", ""))
    with torch.no_grad():  # norms off 1 so the test sees them
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(d, safe_serialization=True)
    write_tokenizer_files(d, VOCAB)
    return d, AutoModelForImageTextToText.from_pretrained(d, attn_implementation="eager").eval()


def test_text_prompts_through_the_engine_match_transformers(checkpoint: tuple[Path, Any]) -> None:
    d, ref = checkpoint
    engine = make_engine(d, kv_page_size=8)
    prompts = random_prompts(2, 480, 2, 20, seed=3)
    for prompt, ours in zip(prompts, all_row_logits(engine, prompts), strict=True):
        assert rel_err(ours, hf_logits(ref, prompt)) < TOL
    assert greedy_generate(engine, prompts[:1], 16)[0] == hf_greedy(ref, prompts[0], 16)


def test_three_equal_positions_are_the_1d_rope() -> None:
    inv, scale = rope_inv_freq(_config().text_config, torch.device("cpu"))
    pos = torch.arange(40)
    for a, b in zip(MRotary(inv, scale, [2, 3, 3]).cos_sin_3d(pos.expand(3, -1), torch.float32),
                    Rotary(inv, scale).cos_sin(pos, torch.float32), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="mrope_section"):
        MRotary(inv, scale, [4, 4])


def _prefill(model: MRopeDeepstack, tokens: list[int], extras: dict[str, Any]) -> torch.Tensor:
    """One sequence's prefill through the model with the engine's torch_ref attention -> logits."""
    n, page = len(tokens), 8
    pages = -(-n // page)
    s = model.spec
    kv = KVCache(KVShape(s.num_layers, s.num_kv_heads, s.head_dim, page, torch.float32), pages,
                 torch.device("cpu"))
    backend = create_backend("torch_ref", AttentionShape(s.num_heads, s.num_kv_heads, s.head_dim, page,
                                                         torch.float32, torch.device("cpu")),
                             model.attention_layer_specs())
    backend.plan(BatchLayout(qo_indptr=np.array([0, n], np.int32),
                             kv_page_indptr=np.array([0, pages], np.int32),
                             kv_page_indices=np.arange(pages, dtype=np.int32),
                             kv_last_page_len=np.array([(n - 1) % page + 1], np.int32),
                             kv_lens=np.array([n], np.int32), custom_masks=[None]))
    pos = torch.arange(n)
    fwd = ForwardContext(backend, kv, pos, pos // page, pos % page)
    fwd.extras.update(extras)
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(tokens), fwd))


def test_image_tokens_with_mrope_and_deepstack_match_transformers(checkpoint: tuple[Path, Any]) -> None:
    d, ref = checkpoint
    model = build_model(get_architecture(ref.config.model_type), ref.config, torch.float32, torch.device("cpu"))
    assert isinstance(model, MRopeDeepstack)
    load_weights(model, checkpoint_files(d))
    model.prepare(torch.device("cpu"))
    rows, cols = 3, 4  # a grid whose sides differ, so the height and width positions differ
    before, after = [5, 6, 7], [8, 9, 10, 11]
    image = [START, *[IMAGE] * (rows * cols), END]
    tokens = before + image + after
    offsets = image_positions(rows, cols)
    span = int(offsets.max()) + 1
    positions = torch.cat([torch.arange(3).expand(3, -1), offsets + 3,
                           (torch.arange(len(after)) + 3 + span).expand(3, -1)], dim=1)
    image_rows = torch.tensor([i for i, t in enumerate(tokens) if t == IMAGE])
    torch.manual_seed(5)
    deep = (torch.randn(rows * cols, 64),)
    ours = _prefill(model, tokens, {MROPE_POSITIONS: positions, DEEPSTACK: DeepstackRows(image_rows, deep)})
    mask = torch.zeros(1, len(tokens), dtype=torch.bool)
    mask[0, image_rows] = True
    with torch.no_grad():
        hidden = ref.model.language_model(input_ids=torch.tensor([tokens]), position_ids=positions[:, None, :],
                                          visual_pos_masks=mask, deepstack_visual_embeds=list(deep)).last_hidden_state
        theirs = ref.lm_head(hidden)[0]
    assert rel_err(ours.numpy(), theirs.numpy()) < TOL
    # the M-RoPE positions and the DeepStack rows both matter: without either the logits move
    plain = _prefill(model, tokens, {DEEPSTACK: DeepstackRows(image_rows, deep)})
    assert rel_err(plain.numpy(), theirs.numpy()) > 1e-3
    no_deep = _prefill(model, tokens, {MROPE_POSITIONS: positions})
    assert rel_err(no_deep.numpy(), theirs.numpy()) > 1e-3


@pytest.mark.parametrize("checkpoint", ["qwen3_vl_moe"], indirect=True)  # only the MoE model stacks experts
def test_experts_in_qwens_own_transposed_layout_load_too(checkpoint: tuple[Path, Any], tmp_path: Path) -> None:
    """Qwen's checkpoints store gate_up_proj [E, H, 2I] and down_proj [E, I, H]; transformers transposes them."""
    d, ref = checkpoint
    assert ref.config.model_type == "qwen3_vl_moe"
    tensors = load_file(str(d / "model.safetensors"))
    swapped = {k: (v.transpose(1, 2).contiguous() if k.endswith(("experts.gate_up_proj", "experts.down_proj"))
                   else v) for k, v in tensors.items()}
    assert any(swapped[k].shape != v.shape for k, v in tensors.items())
    for f in d.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, tmp_path / f.name)
    save_file(swapped, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    prompt = random_prompts(1, 480, 12, 12, seed=4)
    theirs = AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation="eager").eval()
    expected = hf_logits(ref, prompt[0])
    assert rel_err(hf_logits(theirs, prompt[0]), expected) < TOL  # transformers reads this layout the same way
    assert rel_err(all_row_logits(make_engine(tmp_path, kv_page_size=8), prompt)[0], expected) < TOL
