"""What the encoder-output cache saves: a Gemma 3 image prefill with the image encoded vs found cached.

A random Gemma3ForConditionalGeneration written by transformers' own classes
(SigLIP 224x224 in 16x16 patches, 2 layers, pooled to 64 soft tokens; a
2-layer text model), float32 on the CPU (`--device` to change). Per image:
`prepare` (PNG decode + preprocess, cold) and the same bytes again (a hash
lookup); a one-request prefill of 16 text tokens + the image, with its
embeddings encoded (the cache cleared first) and with them cached. The
table's ratio is encoded / cached in the same run.

    python bench/image_prefill.py [--repeats 10] [--device cpu]
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timing import median_ms


def _checkpoint(directory: Path) -> Path:
    from transformers import AutoConfig, AutoModelForImageTextToText

    from pie.tiny_model import write_tokenizer_files

    text = {"model_type": "gemma3_text", "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
            "query_pre_attn_scalar": 64, "sliding_window": 512, "max_position_embeddings": 4096}
    vision = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 224, "patch_size": 16}
    config = AutoConfig.for_model("gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=49,
                                  image_token_index=510, boi_token_index=508, eoi_token_index=509)
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(directory)
    write_tokenizer_files(directory, 512)
    (directory / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 224, "width": 224}}))
    return directory


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from pie.engine.batch import ForwardBatch, OutputSpec, Request, Sampler
    from pie.engine.config import EngineConfig
    from pie.engine.engine import Engine

    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(EngineConfig(model=str(_checkpoint(Path(tmp))), device=args.device, max_num_kv_pages=64,
                                     activation_dtype="float32", max_num_embeds=64))
        assert engine.vision is not None
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(buf, "PNG")
        data = buf.getvalue()

        def prepare_cold() -> None:
            assert engine.vision is not None
            engine.vision.store = type(engine.vision.store)(engine.vision.store.budget, engine.vision.store._size)
            engine.prepare_image(data)

        prepare_ms = median_ms(prepare_cold, args.repeats)
        info = engine.prepare_image(data)
        cached_prepare_ms = median_ms(lambda: engine.prepare_image(data), args.repeats)
        tokens = list(range(16)) + info.tokens
        n = len(tokens)
        request = Request(tokens, list(range(n)), list(range(-(-n // 16))), (n - 1) % 16 + 1,
                          [OutputSpec(n - 1, Sampler())], images=[(info.key, 16)])

        def prefill(clear: bool) -> None:
            assert engine.vision is not None
            if clear:
                engine.vision.cache = type(engine.vision.cache)(engine.vision.cache.budget, engine.vision.cache._size)
            engine.forward_batch(ForwardBatch([request]))

        encoded_ms = median_ms(lambda: prefill(True), args.repeats)
        cached_ms = median_ms(lambda: prefill(False), args.repeats)
    print(f"{'what':<34}{'ms':>10}")
    print(f"{'prepare (decode + preprocess)':<34}{prepare_ms:>10.2f}")
    print(f"{'prepare, same bytes again':<34}{cached_prepare_ms:>10.3f}")
    print(f"{'prefill, image encoded':<34}{encoded_ms:>10.2f}")
    print(f"{'prefill, embeddings cached':<34}{cached_ms:>10.2f}")
    print(f"ratio encoded / cached: {encoded_ms / cached_ms:.2f}x ({len(tokens)} rows, {len(info.embed_rows)} "
          f"image rows, device {args.device})")
    print(f"RESULT prepare_ms={prepare_ms:.2f} prepare_cached_ms={cached_prepare_ms:.3f}")
    print(f"RESULT prefill_encoded_ms={encoded_ms:.2f} prefill_cached_ms={cached_ms:.2f} "
          f"ratio={encoded_ms / cached_ms:.2f}")


if __name__ == "__main__":
    main()
