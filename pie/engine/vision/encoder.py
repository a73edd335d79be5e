"""The engine's media side: prepare images and audio clips, encode them on demand, place their embeddings.

    vision = VisionEncoder.load(model_dir, hf_config, text_model, dtype, device, ...)
    info = vision.prepare(png_bytes)            # ImageInfo: key (content hash), tokens, embed rows
    clip = vision.prepare_audio(wav_bytes)      # the same for an audio clip (kind AUDIO), where a tower runs it
    placed = vision.place(batch, layout, positions, max_num_embeds)  # None, or what the forward adds

A request names the images it holds by (key, row of the image's first token in
this request's tokens), the row negative when the image began in an earlier
pass (a chunked prefill). `place` checks each placement against the image's
tokens, encodes the images whose embeddings are not cached (one tower call per
batch), and for towers whose images attend both ways makes the request's mask
causal-or-same-image, which is how transformers masks a Gemma 3 prefill (every
layer) and a Gemma 4 one (its sliding-window layers only: `BatchLayout.window_masks`). Images with M-RoPE offsets (Qwen3-VL, Qwen 3.5) must sit at the 1-D
positions `start + ImageInfo.position_offsets`; the batch's (t, h, w)
positions are then the 1-D ones with each image row's replaced by start + its
offsets. Every problem is a `BatchError` naming the request, before device work.

Each `MediaKind` has its processor and tower (`towers`); a prepared clip is an `ImageInfo` of kind AUDIO
whose `PreparedImage` holds its log-mel features, so clips ride the same store, cache, requests and
placement as images, and a batch's missing embeddings take one tower call per kind. Audio rows never
attend both ways (only images of a `bidirectional` tower do).
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
from pie.engine.models.decoder import INPUT_EMBEDS
from pie.engine.models.multimodal import DEEPSTACK, MROPE_POSITIONS, DeepstackRows
from pie.engine.vision import CONFIG_KEYS, family_classes, serves_audio, serves_images
from pie.engine.vision.audio import decode_wav
from pie.engine.vision.base import ImageEmbeddings, encode_images
from pie.engine.vision.common import PreparedImage
from pie.engine.vision.encode_cache import EncodeStats, LRUBytes
from pie.engine.vision.info import ImageInfo, MediaKind
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
    deepstack: tuple[torch.Tensor, ...] = ()  # k-th: [n, hidden], added to the rows after decoder layer k
    mrope: torch.Tensor | None = None  # [3, num_tokens] int64: every row's (t, h, w) positions

    def extras(self) -> dict[str, Any]:
        """The `ForwardContext.extras` the text model reads them from."""
        out: dict[str, Any] = {INPUT_EMBEDS: (self.rows, self.values)}
        if self.deepstack:
            out[DEEPSTACK] = DeepstackRows(self.rows, self.deepstack)
        if self.mrope is not None:
            out[MROPE_POSITIONS] = self.mrope
        return out


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
    def __init__(self, processors: dict[MediaKind, Any], towers: dict[MediaKind, torch.nn.Module],
                 store_budget: int, cache_budget: int) -> None:
        self.processors, self.towers = processors, towers
        # The image side, which every encoder has; its tower's mask rules apply to images only.
        self.processor, self.tower = processors[MediaKind.IMAGE], towers[MediaKind.IMAGE]
        self.bidirectional = bool(self.tower.bidirectional)
        # Gemma 4: the image blocks attend both ways on the sliding-window layers only, causally on the rest.
        self.sliding_only = getattr(self.tower, "bidirectional_layers", "all") == "sliding"
        self.store: LRUBytes[_Entry] = LRUBytes(store_budget, lambda e: e.image.pixel_values.nbytes)
        # The encoded bytes too (far smaller than the pixels), so an image whose pixels were evicted while a
        # context still holds it is prepared again when a pass needs it, instead of failing the pass.
        self.sources: LRUBytes[tuple[bytes, ImageInfo]] = LRUBytes(store_budget + SOURCE_BYTES,
                                                                   lambda src: len(src[0]))
        self.cache: LRUBytes[ImageEmbeddings] = LRUBytes(cache_budget, lambda e: e.nbytes)
        self.stats = EncodeStats()

    @classmethod
    def load(cls, model_dir: Path, hf_config: Any, text_model: Any, files: list[Path], dtype: torch.dtype,
             device: torch.device, dummy: bool, seed: int, budget_mb: int) -> VisionEncoder | None:
        """The family's processors and towers (images; audio where the family's audio tower runs and the
        checkpoint has one) with the checkpoint's tensors; None for text-only families."""
        model_type = str(getattr(hf_config, "model_type", ""))
        if not serves_images(model_type) or getattr(hf_config, "vision_config", None) is None:
            return None  # a text-only family, or a checkpoint of an image family written without its tower
        kinds = [MediaKind.IMAGE]
        if serves_audio(model_type) and getattr(hf_config, CONFIG_KEYS[MediaKind.AUDIO], None) is not None:
            kinds.append(MediaKind.AUDIO)  # a checkpoint written without its audio tower serves images only
        path = model_dir / "preprocessor_config.json"
        preprocessor = json.loads(path.read_text()) if path.exists() else {}
        processors: dict[MediaKind, Any] = {}
        towers: dict[MediaKind, Any] = {}
        for kind in kinds:
            processor_cls, tower_cls = family_classes(model_type, kind)
            processors[kind] = processor_cls(preprocessor, hf_config)
            towers[kind] = tower_cls.from_config(hf_config, dtype, device)
        if dummy:
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for tower in towers.values():
                    for p in tower.parameters():
                        p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))
        else:
            from safetensors import safe_open

            for f in files:
                with safe_open(str(f), framework="pt") as handle:
                    for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                        if text_model.map_checkpoint_name(key) is None:
                            tensor = handle.get_tensor(key)
                            for tower in towers.values():
                                if tower.load_tensor(key, tensor):
                                    break  # each tower takes its own prefixes only
            for tower in towers.values():
                tower.check_loaded()
        budget = budget_mb * MiB
        return cls(processors, towers, store_budget=budget, cache_budget=budget)

    # -- images in --

    def prepare(self, data: bytes, max_pixels: int = 0) -> ImageInfo:
        """Decode and prepare `data`, keep it under its content hash; the same bytes are prepared once."""
        key = hashlib.sha256(data).hexdigest()
        entry = self.store.get(key)
        if entry is not None and entry.info.kind is MediaKind.IMAGE:
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

    @property
    def serves_audio(self) -> bool:
        return MediaKind.AUDIO in self.towers

    def prepare_audio(self, data: bytes, max_seconds: float = 0.0) -> ImageInfo:
        """Decode (WAV) and featurise a clip, keep it under its content hash; the same bytes are prepared
        once. InputError for bytes that are no WAV, or a clip over `max_seconds` (0: the extractor's own
        limit, Gemma 4's 30 s) or too short for one frame."""
        processor = self.processors.get(MediaKind.AUDIO)
        if processor is None:
            raise InputError("this model takes no audio (its checkpoint has no audio tower pie runs)")
        limit = min(max_seconds or processor.max_seconds, processor.max_seconds)
        key = hashlib.sha256(data).hexdigest()
        entry = self.store.get(key)
        if entry is not None and entry.info.kind is MediaKind.AUDIO:
            if entry.info.seconds > limit:
                raise InputError(f"the audio is {entry.info.seconds:.2f} s long, over the limit of {limit:g} s")
            return entry.info
        waveform = decode_wav(data, processor.sampling_rate, limit)
        clip = processor.prepare(waveform)
        info = ImageInfo(key, list(clip.tokens), list(clip.embed_rows), tuple(clip.grid), None, False, 0, 0,
                         kind=MediaKind.AUDIO, seconds=len(waveform) / processor.sampling_rate)
        self.store.put(key, _Entry(clip, info))
        self.sources.put(key, (data, info))
        return info

    def _reprepare(self, data: bytes, info: ImageInfo) -> PreparedImage:
        if info.kind is MediaKind.AUDIO:
            processor = self.processors[MediaKind.AUDIO]
            out: PreparedImage = processor.prepare(decode_wav(data, processor.sampling_rate, processor.max_seconds))
            return out
        image: PreparedImage = self.processor.prepare(decode_image(data))
        return image

    def _hold(self, keys: frozenset[str]) -> None:
        """Every key of a batch in the store: evicted pixels (features) are prepared again from their bytes."""
        for key in keys:
            if key not in self.store and (source := self.sources.get(key)) is not None:
                data, info = source
                self.store.put(key, _Entry(self._reprepare(data, info), info), keep=keys)
                self.stats.reprepared += 1

    def info(self, key: str) -> ImageInfo | None:
        entry = self.store.get(key)
        return entry.info if entry is not None else None

    # -- a batch --

    def embeddings(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Each key's [len(embed_rows), hidden] embeddings: cached ones reused, the rest in one tower call."""
        return {key: e.embeds for key, e in self.encoded(keys).items()}

    def encoded(self, keys: list[str]) -> dict[str, ImageEmbeddings]:
        """Each key's tower outputs (embeddings, DeepStack levels): cached ones reused, the rest in one call."""
        keep = frozenset(keys)
        out: dict[str, ImageEmbeddings] = {}
        todo: list[str] = []
        for key in dict.fromkeys(keys):
            hit = self.cache.get(key)
            if hit is not None:
                out[key] = hit
                self.stats.cache_hits += 1
            else:
                todo.append(key)
        entries = {k: self.store.get(k) for k in todo}
        assert all(e is not None for e in entries.values()), "place() checked every key"
        for kind, tower in self.towers.items():  # one tower call per kind that has work
            keys_of = [k for k, e in entries.items() if e is not None and e.info.kind is kind]
            if not keys_of:
                continue
            encoded = encode_images(tower, [e.image for k in keys_of if (e := entries[k]) is not None])
            self.stats.encoder_calls += 1
            self.stats.encoded += len(keys_of)
            for key, emb in zip(keys_of, encoded, strict=True):
                out[key] = emb
                self.cache.put(key, emb, keep)
        return out

    def place(self, batch: ForwardBatch, layout: BatchLayout, positions: np.ndarray,
              max_num_embeds: int) -> PlacedEmbeds | None:
        """Check every request's images, encode what is missing, OR the images' blocks into the masks.

        positions: the batch's [T] 1-D positions (`PreparedBatch.positions`), the base of the M-RoPE ones."""
        self._hold(frozenset(key for req in batch.requests if req.images for key, _ in req.images))
        placements: list[tuple[int, int, str, list[int]]] = []  # (flat row of embed row 0, request, key, rows)
        blocks: dict[int, list[tuple[int, int]]] = {}
        mrope: np.ndarray | None = None  # [3, T], made when an image has M-RoPE offsets
        for r, req in enumerate(batch.requests):
            if not req.images:
                continue
            q_len, start = len(req.tokens), int(layout.qo_indptr[r])
            count = 0
            for key, row0 in req.images:
                info = self._checked(r, req.tokens, key, row0)
                lo, hi = max(0, row0), min(q_len, row0 + len(info.tokens))
                if info.positions is not None:
                    if mrope is None:
                        mrope = np.repeat(positions[None, :], 3, axis=0)
                    _place_mrope(r, mrope, positions, info, start + row0, start + lo, start + hi)
                rows = [j for j in info.embed_rows if lo <= row0 + j < hi]
                both_ways = self.bidirectional and info.kind is MediaKind.IMAGE
                if both_ways and rows and row0 + info.embed_rows[-1] >= q_len:
                    raise BatchError(f"request {r}: image {key[:16]}... is split between passes ({len(rows)} of "
                                     f"its {len(info.embed_rows)} embedding rows here); this model attends both "
                                     "ways within an image, so its tokens must be in one pass")
                if not rows:
                    continue
                count += len(rows)
                placements.append((start + row0, r, key, rows))
                if both_ways:
                    blocks.setdefault(r, []).append((row0 + rows[0], row0 + rows[-1] + 1))
            if count > max_num_embeds:
                raise BatchError(f"request {r}: {count} image embedding rows, over max_num_embeds = "
                                 f"{max_num_embeds}; raise max_num_embeds or send fewer images per pass")
        if not placements:
            return None
        for r, spans in blocks.items():
            _or_blocks(layout, r, spans, self.sliding_only)
        return self._gather(placements, mrope)

    def _checked(self, r: int, req_tokens: list[int], key: str, row0: int) -> ImageInfo:
        """The info of image `key` placed at row `row0` of request r, whose rows must hold its tokens."""
        entry = self.store.get(key)
        if entry is None:
            raise BatchError(f"request {r}: image {key[:16]}... is not held by the engine (never prepared, "
                             "or evicted from the image store); prepare it again before the pass")
        info = entry.info
        q_len = len(req_tokens)
        lo, hi = max(0, row0), min(q_len, row0 + len(info.tokens))
        if lo >= hi:
            raise BatchError(f"request {r}: image {key[:16]}... at row {row0} covers none of the "
                             f"request's {q_len} rows (it has {len(info.tokens)} tokens)")
        tokens = [int(t) for t in req_tokens[lo:hi]]
        if tokens != info.tokens[lo - row0:hi - row0]:
            raise BatchError(f"request {r}: rows {lo}..{hi - 1} do not hold image {key[:16]}...'s tokens "
                             f"(its tokens {lo - row0}..{hi - row0 - 1}); an image's placeholder tokens "
                             "must be passed as the image gave them")
        return info

    def _gather(self, placements: list[tuple[int, int, str, list[int]]],
                mrope: np.ndarray | None) -> PlacedEmbeds:
        """The placed rows' embeddings (and DeepStack levels) in row order, on the tower's device."""
        encoded = self.encoded([key for _, _, key, _ in placements])
        flat_rows: list[int] = []
        pieces: list[ImageEmbeddings] = []
        for base, _r, key, rows in placements:
            held = self.store.get(key)
            assert held is not None
            index = {j: k for k, j in enumerate(held.info.embed_rows)}
            flat_rows.extend(base + j for j in rows)
            first, last = index[rows[0]], index[rows[-1]] + 1
            e = encoded[key]
            pieces.append(ImageEmbeddings(e.embeds[first:last], tuple(d[first:last] for d in e.deepstack)))
        device = self.tower_device
        levels = {len(p.deepstack) for p in pieces}
        assert len(levels) == 1, f"one tower gave images different DeepStack depths: {levels}"
        deepstack = tuple(torch.cat([p.deepstack[k] for p in pieces]) for k in range(levels.pop()))
        return PlacedEmbeds(torch.tensor(flat_rows, dtype=torch.long).to(device, non_blocking=True),
                            torch.cat([p.embeds for p in pieces]), deepstack,
                            None if mrope is None else torch.from_numpy(mrope).to(device, non_blocking=True))

    @property
    def tower_device(self) -> torch.device:
        return next(self.tower.parameters()).device


def _place_mrope(r: int, mrope: np.ndarray, positions: np.ndarray, info: ImageInfo, base: int, lo: int,
                 hi: int) -> None:
    """Flat rows [lo, hi) of an image whose token 0 is at flat row `base`: check that their 1-D positions
    are start + `position_offsets` for one start, and write start + the (t, h, w) offsets into `mrope`."""
    offsets = np.asarray(info.positions, dtype=np.int64)[:, lo - base:hi - base]  # [3, hi - lo]
    starts = positions[lo:hi] - offsets[0]
    if (starts != starts[0]).any():
        raise BatchError(f"request {r}: the positions of image {info.key[:16]}...'s rows are not its start plus "
                         f"its position offsets (they imply starts {sorted(set(starts.tolist()))[:4]}); place an "
                         "image's tokens at start + Image.position_offsets")
    mrope[:, lo:hi] = starts[0] + offsets


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
