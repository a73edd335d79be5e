"""Run a hybrid (linear + full attention) model on sequences with explicit state slots, without an Engine.

The model tests' and `bench/hybrid_decode.py`'s harness: the same pieces
`Engine.forward_batch` uses (the model, the paged `KVCache` for the full-attention layers, the
`torch_ref` attention backend planned from a `BatchLayout`, the `StatePool`
read through a `RecurrentBatch`), with the page and slot bookkeeping the
runtime does kept here in the simplest form (every sequence owns its
pages; a fork copies them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pie.engine.attention.base import AttentionShape, BatchLayout, create_backend
from pie.engine.forward_context import ForwardContext
from pie.engine.kv_cache import KVCache, KVShape
from pie.engine.loader import build_model, checkpoint_files, init_dummy_weights, load_weights
from pie.engine.models.hybrid import HybridCausalLM
from pie.engine.models.registry import get_architecture
from pie.engine.state_pool import RECURRENT_EXTRAS, RecurrentBatch, StatePool
from pie.errors import BatchError


@dataclass
class _Sequence:
    slot: int
    pages: list[int] = field(default_factory=list)
    kv_len: int = 0


class HybridRunner:
    def __init__(self, model: HybridCausalLM, *, num_pages: int, page_size: int, num_slots: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.device, self.page_size = model, device, page_size
        s = model.spec
        self.kv = KVCache(KVShape(s.num_kv_layers, s.num_kv_heads, s.head_dim, page_size, dtype), num_pages, device)
        self.backend = create_backend("torch_ref", AttentionShape(s.num_heads, s.num_kv_heads, s.head_dim,
                                                                  page_size, dtype, device),
                                      model.attention_layer_specs())
        self.states = StatePool(model.spec.state_shape(dtype), num_slots, device)
        self._free_pages = list(range(num_pages - 1, -1, -1))
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._seqs: dict[int, _Sequence] = {}
        self._next_id = 0

    @classmethod
    def load(cls, model_dir: Path, *, dtype: torch.dtype = torch.float32, device: torch.device | None = None,
             dummy_weights: bool = False, **sizes: int) -> HybridRunner:
        """A checkpoint directory (or, with dummy_weights, only its config.json) -> a runner."""
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(str(model_dir))
        return cls.from_config(hf_config, None if dummy_weights else model_dir, dtype=dtype, device=device, **sizes)

    @classmethod
    def from_config(cls, hf_config: Any, model_dir: Path | None, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | None = None, num_pages: int = 256, page_size: int = 16,
                    num_slots: int = 8) -> HybridRunner:
        """Weights from `model_dir`, or deterministic random ones when it is None (benchmarks)."""
        device = device or torch.device("cpu")
        model = build_model(get_architecture(hf_config.model_type), hf_config, dtype, device)
        assert isinstance(model, HybridCausalLM)
        if model_dir is None:
            init_dummy_weights(model)
        else:
            load_weights(model, checkpoint_files(model_dir))
        model.prepare(device)
        return cls(model, num_pages=num_pages, page_size=page_size, num_slots=num_slots, device=device,
                   dtype=dtype)

    # -- sequences (the runtime's job once integrated) --

    def new_sequence(self) -> int:
        if not self._free_slots:
            raise BatchError(f"all {self.states.num_slots} state slots are in use; free a sequence first")
        seq_id, self._next_id = self._next_id, self._next_id + 1
        self._seqs[seq_id] = _Sequence(self._free_slots.pop())
        return seq_id

    def fork(self, seq_id: int) -> int:
        """A new sequence continuing from `seq_id`'s tokens: its state slot and KV pages copied."""
        src = self._seqs[seq_id]
        new_id = self.new_sequence()
        dst = self._seqs[new_id]
        dst.pages, dst.kv_len = self._take_pages(len(src.pages)), src.kv_len
        self.kv.copy_pages(src.pages, dst.pages)
        self.states.copy([src.slot], [dst.slot])
        return new_id

    def free(self, seq_id: int) -> None:
        seq = self._seqs.pop(seq_id)
        self._free_pages += seq.pages
        self._free_slots.append(seq.slot)

    def slot_of(self, seq_id: int) -> int:
        return self._seqs[seq_id].slot

    def _take_pages(self, n: int) -> list[int]:
        if n > len(self._free_pages):
            raise BatchError(f"need {n} more KV pages, {len(self._free_pages)} are free")
        return [self._free_pages.pop() for _ in range(n)]

    # -- one batch --

    @torch.inference_mode()
    def forward(self, chunks: dict[int, list[int]], *, all_rows: bool = True) -> dict[int, torch.Tensor]:
        """Append each sequence's new tokens in one batch -> float32 logits per sequence.

        [len(tokens), vocab] for every new token, or [1, vocab] for the last one when all_rows is False
        (the LM head then runs on one row per sequence, as the engine's output rows do).
        """
        seqs = [self._seqs[i] for i in chunks]
        toks = [chunks[i] for i in chunks]
        qo = np.cumsum([0, *(len(t) for t in toks)]).astype(np.int32)
        positions, w_page, w_off, kv_lens = [], [], [], []
        for seq, t in zip(seqs, toks, strict=True):
            start, seq.kv_len = seq.kv_len, seq.kv_len + len(t)
            need = -(-seq.kv_len // self.page_size) - len(seq.pages)
            seq.pages += self._take_pages(max(0, need))
            slots_ = np.arange(start, seq.kv_len)
            positions.append(slots_)
            w_page.append(np.asarray(seq.pages)[slots_ // self.page_size])
            w_off.append(slots_ % self.page_size)
            kv_lens.append(seq.kv_len)
        layout = BatchLayout(
            qo_indptr=qo, kv_page_indptr=np.cumsum([0, *(len(s.pages) for s in seqs)]).astype(np.int32),
            kv_page_indices=np.concatenate([s.pages for s in seqs]).astype(np.int32),
            kv_last_page_len=np.array([(n - 1) % self.page_size + 1 for n in kv_lens], np.int32),
            kv_lens=np.array(kv_lens, np.int32), custom_masks=[None] * len(seqs))
        self.backend.plan(layout)
        dev = self.device
        pos_t, page_t, off_t = (torch.from_numpy(np.concatenate(a).astype(np.int64)).to(dev)
                                for a in (positions, w_page, w_off))
        fwd = ForwardContext(self.backend, self.kv, pos_t, page_t, off_t)
        fresh = [s.kv_len == len(t) for s, t in zip(seqs, toks, strict=True)]
        fwd.extras[RECURRENT_EXTRAS] = RecurrentBatch(self.states, qo.tolist(), [s.slot for s in seqs], fresh)
        tokens = torch.tensor([x for t in toks for x in t], dtype=torch.long, device=dev)
        hidden = self.model(tokens, fwd)
        if not all_rows:
            last = self.model.compute_logits(hidden[torch.from_numpy(qo[1:] - 1).long().to(dev)])
            return {i: last[r:r + 1] for r, i in enumerate(chunks)}
        logits = self.model.compute_logits(hidden)
        return {i: logits[qo[r]:qo[r + 1]] for r, i in enumerate(chunks)}
