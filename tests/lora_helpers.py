"""PEFT LoRA adapters for the tiny checkpoints, made by PEFT itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from checkpoints import load_reference


def make_adapter(base_dir: Path, out_dir: Path, *, seed: int, **lora: Any) -> Any:
    """A random PEFT LoRA adapter for the checkpoint in base_dir, saved to out_dir; returns the PEFT model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_reference(base_dir), LoraConfig(**lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)  # PEFT starts B at zero: make the update real
    model.save_pretrained(out_dir)
    return model.eval()
