"""LoRA adapters: PEFT directories loaded into slots and applied per request in mixed batches.

Adapters are made by PEFT itself on the tiny checkpoints (LoraConfig +
get_peft_model, lora_B perturbed so the update is not zero, save_pretrained),
and the reference is the PEFT-wrapped transformers model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from checkpoints import VOCAB, load_reference
from engine_helpers import all_row_logits, make_engine, random_prompts, rel_err
from lora_helpers import make_adapter
from parity_helpers import engine_greedy, hf_greedy_with_logits

from pie.errors import AdapterError, BatchError

TOL = 1e-4
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_logits(model: Any, prompt: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([prompt])).logits[0].float().numpy()


# arch -> LoRA options: fused q/k/v shards (qwen3, with per-module ranks / alphas and rsLoRA), projections
# fused in the checkpoint (phi3), a multimodal wrapper's text part (mistral3), separate q/k/v (gemma4).
ADAPTERS: dict[str, dict[str, Any]] = {
    "qwen3": {"r": 4, "lora_alpha": 8, "target_modules": ALL_PROJ, "use_rslora": True,
              "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3.0}},
    "phi3": {"r": 4, "lora_alpha": 16, "target_modules": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]},
    "mistral3": {"r": 8, "lora_alpha": 8, "target_modules": r".*language_model.*\.(q_proj|v_proj|up_proj)"},
    "gemma4_text": {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
}


@pytest.mark.parametrize("arch", list(ADAPTERS))
def test_adapter_output_equals_peft(arch: str, checkpoint_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = checkpoint_dir(arch)
    ref = make_adapter(d, tmp_path / "adapter", seed=1, **ADAPTERS[arch])
    engine = make_engine(d, kv_page_size=8)
    slot = engine.load_adapter(tmp_path / "adapter")
    prompts = random_prompts(2, VOCAB, 3, 20, seed=2)
    with_adapter = all_row_logits(engine, prompts, adapter=slot)
    for prompt, ours in zip(prompts, with_adapter, strict=True):
        expected = peft_logits(ref, prompt)
        assert rel_err(ours, expected) < TOL
        with ref.disable_adapter():
            assert rel_err(ours, peft_logits(ref, prompt)) > 1e-2  # the adapter really changed the output
    tokens, steps = engine_greedy(engine, prompts[:1], 12, adapters=[slot])
    ref_tokens, ref_steps = hf_greedy_with_logits(ref, prompts[0], 12)
    assert tokens[0] == ref_tokens
    assert max(rel_err(a, b) for a, b in zip(steps[0], ref_steps, strict=True)) < TOL


def test_batch_mixing_three_adapters_and_none_equals_each_alone(checkpoint_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = checkpoint_dir("qwen3")
    configs = [{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
               {"r": 8, "lora_alpha": 8, "target_modules": ALL_PROJ},
               {"r": 4, "lora_alpha": 2, "target_modules": ["gate_proj", "up_proj", "down_proj", "o_proj"]}]
    refs = [make_adapter(d, tmp_path / f"a{i}", seed=10 + i, **c) for i, c in enumerate(configs)]
    engine = make_engine(d, kv_page_size=4)
    slots = [engine.load_adapter(tmp_path / f"a{i}") for i in range(3)]
    adapters = [slots[2], None, slots[0], slots[1]]  # rows of different adapters interleaved, one without
    prompts = random_prompts(4, VOCAB, 3, 15, seed=3)
    mixed_tokens, mixed_steps = engine_greedy(engine, prompts, 6, adapters=adapters)
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters, strict=True)):
        alone_tokens, alone_steps = engine_greedy(engine, [prompt], 6, adapters=[adapter])
        assert mixed_tokens[i] == alone_tokens[0]
        assert max(rel_err(a, b) for a, b in zip(mixed_steps[i], alone_steps[0], strict=True)) < 1e-5
        ref = refs[slots.index(adapter)] if adapter is not None else load_reference(d)
        assert rel_err(mixed_steps[i][0], peft_logits(ref, prompt)[-1]) < TOL


def test_rank_over_the_limit_is_refused_and_the_engine_goes_on(checkpoint_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = checkpoint_dir("qwen3")
    make_adapter(d, tmp_path / "big", seed=4, r=16, lora_alpha=16, target_modules=["q_proj"])
    make_adapter(d, tmp_path / "small", seed=5, r=4, lora_alpha=8, target_modules=["q_proj"])
    engine = make_engine(d, max_adapter_rank=8)
    prompt = random_prompts(1, VOCAB, 5, 5, seed=6)
    before = all_row_logits(engine, prompt)[0]
    with pytest.raises(AdapterError, match=r"rank 16.*max_adapter_rank = 8.*at least 16"):
        engine.load_adapter(tmp_path / "big")
    assert engine.adapters.resident() == []
    np.testing.assert_array_equal(all_row_logits(engine, prompt)[0], before)
    slot = engine.load_adapter(tmp_path / "small")
    assert engine.adapter_info(slot).rank == 4


def test_slot_overflow_says_which_limit_to_raise(checkpoint_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = checkpoint_dir("qwen3")
    make_adapter(d, tmp_path / "a", seed=7, r=2, lora_alpha=2, target_modules=["v_proj"])
    engine = make_engine(d, max_num_adapters=2)
    assert [engine.load_adapter(tmp_path / "a") for _ in range(2)] == [0, 1]
    with pytest.raises(AdapterError, match=r"all 2 adapter slots are in use.*raise max_num_adapters"):
        engine.load_adapter(tmp_path / "a")
    with pytest.raises(AdapterError, match=r"slot 5 is out of range.*max_num_adapters = 2"):
        engine.load_adapter(tmp_path / "a", slot=5)
    engine.unload_adapter(0)
    assert engine.load_adapter(tmp_path / "a") == 0


def test_request_naming_an_empty_slot_is_a_batch_error(checkpoint_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = checkpoint_dir("qwen3")
    engine = make_engine(d)
    prompt = random_prompts(1, VOCAB, 4, 4, seed=8)
    with pytest.raises(BatchError, match=r"request 0 uses adapter slot 3, which holds no adapter"):
        all_row_logits(engine, prompt, adapter=3)
    assert len(all_row_logits(engine, prompt)[0]) == 4  # the engine serves the next batch


def test_save_and_fork_round_trip_through_peft(checkpoint_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel

    d = checkpoint_dir("qwen3")
    make_adapter(d, tmp_path / "orig", seed=9, r=4, lora_alpha=8, target_modules=ALL_PROJ)
    engine = make_engine(d)
    slot = engine.load_adapter(tmp_path / "orig")
    fork = engine.fork_adapter(slot)
    engine.unload_adapter(slot)  # the fork does not depend on the original
    engine.save_adapter(fork, tmp_path / "saved")
    reloaded = PeftModel.from_pretrained(load_reference(d), tmp_path / "saved").eval()
    prompt = random_prompts(1, VOCAB, 9, 9, seed=10)
    assert rel_err(all_row_logits(engine, prompt, adapter=fork)[0], peft_logits(reloaded, prompt[0])) < TOL


def test_unsupported_adapters_are_refused_with_the_reason(checkpoint_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = checkpoint_dir("qwen3")
    make_adapter(d, tmp_path / "dora", seed=11, r=2, lora_alpha=2, target_modules=["q_proj"], use_dora=True)
    make_adapter(d, tmp_path / "embed", seed=12, r=2, lora_alpha=2, target_modules=["embed_tokens"])
    engine = make_engine(d)
    with pytest.raises(AdapterError, match="use_dora"):
        engine.load_adapter(tmp_path / "dora")
    with pytest.raises(AdapterError, match=r"not a LoRA A/B matrix|not a projection"):
        engine.load_adapter(tmp_path / "embed")
    with pytest.raises(AdapterError, match=r"adapter_config\.json is missing"):
        engine.load_adapter(tmp_path / "nowhere")
    assert engine.adapters.resident() == []
    assert len(all_row_logits(engine, [[5, 6, 7]])[0]) == 3
