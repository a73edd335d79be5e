"""The engine's image side: prepare images, encode them on demand, place their embeddings in a batch.

    vision = VisionEncoder.load(model_dir, hf_config, text_model, dtype, device, ...)
    info = vision.prepare(png_bytes)            # ImageInfo: key (content hash), tokens, embed rows
    placed = vision.place(batch, prep, limits)  # None, or the rows and embeddings for the forward

A request names the images it holds by (key, row of the image's first token in
this request's tokens), the row negative when the image began in an earlier
pass (a chunked prefill). `place` checks each placement against the image's
tokens, encodes the images whose embeddings are not cached (one tower call per
batch), and for towers whose images attend both ways makes the request's mask
causal-or-same-image, which is how transformers masks a Gemma 3 prefill (every
layer) and a Gemma 4 one (its sliding-window layers only: `BatchLayout.window_masks`).
Every problem is a `BatchError` naming the request, before device work.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pie.engine.attention.base import BatchLayout
from pie.engine.batch import ForwardBatch
from pie.engine.vision import family_classes, serves_images
from pie.engine.vision.base import VisionTower
from pie.engine.vision.common import PreparedImage
from pie.engine.vision.encode_cache import EncodeStats, LRUBytes
from pie.engine.vision.info import ImageInfo
from pie.errors import BatchError, InputError

MiB = 1 << 20
SOURCE_BYTES = 256 * MiB  # encoded images kept beyond the pixel budget (a PNG is ~10x smaller than its pixels)
# Decoding bombs: Pillow's own guard, made an error instead of a warning.
MAX_DECODE_PIXELS = 64 * 1024 * 1024


@dataclass
class _Entry:
    image: PreparedImage
    info: ImageInfo


@dataclass
class PlacedEmbeds:
    """The batch rows (flat, over all requests) that take embeddings, and those embeddings in row order."""

    rows: torch.Tensor  # [n] int64 on the device
    values: torch.Tensor  # [n, hidden] in the tower's dtype, on the device


def decode_image(data: bytes, max_pixels: int = MAX_DECODE_PIXELS) -> Image.Image:
    """Encoded bytes (PNG, JPEG, WebP, GIF, ...) -> a loaded PIL image, or an InputError saying why not."""
    if not data:
        raise InputError("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            w, h = image.size
            if w * h > max_pixels:
                raise InputError(f"the image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
                                 "([runtime] max_image_pixels); send a smaller image")
            image.load()
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as e:
        raise InputError(f"the image cannot be decoded ({len(data)} bytes): {type(e).__name__}: {e}; send PNG, "
                         "JPEG, WebP or GIF bytes") from None
    return image


class VisionEncoder:
    def __init__(self, processor: Any, tower: VisionTower, store_budget: int, cache_budget: int) -> None:
        self.processor, self.tower = processor, tower
        self.bidirectional = bool(tower.bidirectional)
        # Gemma 4: the image blocks attend both ways on the sliding-window layers only, causally on the rest.
        self.sliding_only = getattr(tower, "bidirectional_layers", "all") == "sliding"
        self.store: LRUBytes[_Entry] = LRUBytes(store_budget, lambda e: e.image.pixel_values.nbytes)
        # The encoded bytes too (far smaller than the pixels), so an image whose pixels were evicted while a
        # context still holds it is prepared again when a pass needs it, instead of failing the pass.
        self.sources: LRUBytes[tuple[bytes, ImageInfo]] = LRUBytes(store_budget + SOURCE_BYTES,
                                                                   lambda src: len(src[0]))
        self.cache: LRUBytes[torch.Tensor] = LRUBytes(cache_budget, lambda t: t.numel() * t.element_size())
        self.stats = EncodeStats()

    @classmethod
    def load(cls, model_dir: Path, hf_config: Any, text_model: Any, files: list[Path], dtype: torch.dtype,
             device: torch.device, dummy: bool, seed: int, budget_mb: int) -> VisionEncoder | None:
        """The family's processor and tower with the checkpoint's vision tensors; None for text-only families."""
        model_type = str(getattr(hf_config, "model_type", ""))
        if not serves_images(model_type) or getattr(hf_config, "vision_config", None) is None:
            return None  # a text-only family, or a checkpoint of an image family written without its tower
        processor_cls, tower_cls = family_classes(model_type)
        path = model_dir / "preprocessor_config.json"
        processor = processor_cls(json.loads(path.read_text()) if path.exists() else {}, hf_config)
        tower = tower_cls.from_config(hf_config, dtype, device)
        if dummy:
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in tower.parameters():
                    p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))
        else:
            from safetensors import safe_open

            for f in files:
                with safe_open(str(f), framework="pt") as handle:
                    for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                        if text_model.map_checkpoint_name(key) is None:
                            tower.load_tensor(key, handle.get_tensor(key))
            tower.check_loaded()
        budget = budget_mb * MiB
        return cls(processor, tower, store_budget=budget, cache_budget=budget)

    # -- images in --

    def prepare(self, data: bytes, max_pixels: int = 0) -> ImageInfo:
        """Decode and prepare `data`, keep it under its content hash; the same bytes are prepared once."""
        key = hashlib.sha256(data).hexdigest()
        entry = self.store.get(key)
        if entry is not None:
            if max_pixels and entry.info.width * entry.info.height > max_pixels:
                raise InputError(f"the image is {entry.info.width}x{entry.info.height} = "
                                 f"{entry.info.width * entry.info.height} pixels, over the limit of {max_pixels}")
            return entry.info
        pil = decode_image(data, min(max_pixels or MAX_DECODE_PIXELS, MAX_DECODE_PIXELS))
        image = self.processor.prepare(pil)
        positions = image.positions.tolist() if image.positions is not None else None
        info = ImageInfo(key, list(image.tokens), list(image.embed_rows), tuple(image.grid), positions,
                         self.bidirectional, pil.size[0], pil.size[1],
                         tuple(getattr(self.processor, "text_around", ("", ""))))
        self.store.put(key, _Entry(image, info))
        self.sources.put(key, (data, info))
        return info

    def _hold(self, keys: frozenset[str]) -> None:
        """Every key of a batch in the store: evicted pixels are prepared again from their bytes."""
        for key in keys:
            if key not in self.store and (source := self.sources.get(key)) is not None:
                data, info = source
                self.store.put(key, _Entry(self.processor.prepare(decode_image(data)), info), keep=keys)
                self.stats.reprepared += 1

    def info(self, key: str) -> ImageInfo | None:
        entry = self.store.get(key)
        return entry.info if entry is not None else None

    # -- a batch --

    def embeddings(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Each key's [len(embed_rows), hidden] embeddings: cached ones reused, the rest in one tower call."""
        keep = frozenset(keys)
        out: dict[str, torch.Tensor] = {}
        todo: list[str] = []
        for key in dict.fromkeys(keys):
            hit = self.cache.get(key)
            if hit is not None:
                out[key] = hit
                self.stats.cache_hits += 1
            else:
                todo.append(key)
        if todo:
            entries = [self.store.get(k) for k in todo]
            assert all(e is not None for e in entries), "place() checked every key"
            encoded = self.tower([e.image for e in entries if e is not None])
            self.stats.encoder_calls += 1
            self.stats.encoded += len(todo)
            for key, emb in zip(todo, encoded, strict=True):
                out[key] = emb
                self.cache.put(key, emb, keep)
        return out

    def place(self, batch: ForwardBatch, layout: BatchLayout, max_num_embeds: int) -> PlacedEmbeds | None:
        """Check every request's images, encode what is missing, OR the images' blocks into the masks."""
        self._hold(frozenset(key for req in batch.requests if req.images for key, _ in req.images))
        placements: list[tuple[int, int, str, list[int]]] = []  # (flat row of embed row 0, request, key, rows)
        blocks: dict[int, list[tuple[int, int]]] = {}
        for r, req in enumerate(batch.requests):
            if not req.images:
                continue
            q_len, start = len(req.tokens), int(layout.qo_indptr[r])
            count = 0
            for key, row0 in req.images:
                entry = self.store.get(key)
                if entry is None:
                    raise BatchError(f"request {r}: image {key[:16]}... is not held by the engine (never prepared, "
                                     "or evicted from the image store); prepare it again before the pass")
                info = entry.info
                lo, hi = max(0, row0), min(q_len, row0 + len(info.tokens))
                if lo >= hi:
                    raise BatchError(f"request {r}: image {key[:16]}... at row {row0} covers none of the "
                                     f"request's {q_len} rows (it has {len(info.tokens)} tokens)")
                tokens = [int(t) for t in req.tokens[lo:hi]]
                if tokens != info.tokens[lo - row0:hi - row0]:
                    raise BatchError(f"request {r}: rows {lo}..{hi - 1} do not hold image {key[:16]}...'s tokens "
                                     f"(its tokens {lo - row0}..{hi - row0 - 1}); an image's placeholder tokens "
                                     "must be passed as the image gave them")
                rows = [j for j in info.embed_rows if lo <= row0 + j < hi]
                if self.bidirectional and rows and row0 + info.embed_rows[-1] >= q_len:
                    raise BatchError(f"request {r}: image {key[:16]}... is split between passes ({len(rows)} of "
                                     f"its {len(info.embed_rows)} embedding rows here); this model attends both "
                                     "ways within an image, so its tokens must be in one pass")
                if not rows:
                    continue
                count += len(rows)
                placements.append((start + row0, r, key, rows))
                if self.bidirectional:
                    blocks.setdefault(r, []).append((row0 + rows[0], row0 + rows[-1] + 1))
            if count > max_num_embeds:
                raise BatchError(f"request {r}: {count} image embedding rows, over max_num_embeds = "
                                 f"{max_num_embeds}; raise max_num_embeds or send fewer images per pass")
        if not placements:
            return None
        for r, spans in blocks.items():
            _or_blocks(layout, r, spans, self.sliding_only)
        embeds = self.embeddings([key for _, _, key, _ in placements])
        flat_rows: list[int] = []
        values: list[torch.Tensor] = []
        for base, _r, key, rows in placements:
            held = self.store.get(key)
            assert held is not None
            index = {j: k for k, j in enumerate(held.info.embed_rows)}
            flat_rows.extend(base + j for j in rows)
            first, last = index[rows[0]], index[rows[-1]]
            values.append(embeds[key][first:last + 1])
        device = self.tower_device
        return PlacedEmbeds(torch.tensor(flat_rows, dtype=torch.long).to(device, non_blocking=True),
                            torch.cat(values, 0))

    @property
    def tower_device(self) -> torch.device:
        return next(self.tower.parameters()).device


def _or_blocks(layout: BatchLayout, r: int, spans: list[tuple[int, int]], sliding_only: bool) -> None:
    """Request r's mask becomes (its mask or causal) OR (both rows inside the same image's span), on every
    layer or (`sliding_only`) on the sliding-window layers alone (`BatchLayout.window_masks`)."""
    q_len = int(layout.qo_indptr[r + 1] - layout.qo_indptr[r])
    kv_len = int(layout.kv_lens[r])
    mask = layout.mask_of(r, windowed=sliding_only)
    if mask is None:
        q_slot = np.arange(kv_len - q_len, kv_len)
        mask = np.arange(kv_len)[None, :] <= q_slot[:, None]
    else:
        mask = mask.copy()
    offset = kv_len - q_len  # kv slot of row 0
    for a, b in spans:
        mask[a:b, offset + a:offset + b] = True
    if sliding_only:
        layout.window_masks[r] = mask
    else:
        layout.custom_masks[r] = mask
