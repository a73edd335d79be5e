"""Resident LoRA adapters: a table of `max_num_adapters` slots filled from PEFT directories.

    table = AdapterTable(model, max_slots=32, max_rank=8, device, dtype)
    slot = table.load("/path/to/peft_dir")        # adapter_config.json + adapter_model.safetensors
    lora = table.batch([slot, None, slot], qo_indptr)   # per-request slots -> LoRABatch for the forward pass
    table.unload(slot)

Loading validates everything (files, PEFT options, rank, target modules,
shapes) before touching the table, so a refused adapter leaves the engine as
it was. Each adapter's scaling (lora_alpha / r, or / sqrt(r) with rsLoRA, with
PEFT's rank_pattern / alpha_pattern) is folded into its B matrices.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pie.engine.layers.linear import Linear
from pie.engine.layers.lora import LoRABatch, LoRAGroup, LoRAWeights
from pie.engine.models.decoder import CausalLM
from pie.errors import AdapterError, BatchError

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
# PEFT options whose math pie does not implement: refuse rather than silently compute something else.
_UNSUPPORTED_OPTIONS = ("use_dora", "lora_bias", "modules_to_save", "layer_replication", "trainable_token_indices",
                        "target_parameters", "use_qalora", "alora_invocation_tokens")


@dataclass(frozen=True)
class AdapterInfo:
    slot: int
    path: str
    rank: int  # the largest rank of any targeted module
    targets: tuple[str, ...]  # the model's Linear modules it updates


@dataclass
class _Resident:
    info: AdapterInfo
    weights: dict[nn.Module, LoRAWeights]
    files: tuple[dict[str, Any], dict[str, torch.Tensor]]  # the PEFT config and tensors, for save / fork


class AdapterTable:
    def __init__(self, model: CausalLM, max_slots: int, max_rank: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.model, self.max_slots, self.max_rank = model, max_slots, max_rank
        self.device, self.dtype = device, dtype
        self._slots: dict[int, _Resident] = {}

    # -- slot management --

    def load(self, path: str | Path, slot: int | None = None) -> int:
        """Load a PEFT LoRA directory into `slot` (replacing what it held) or the lowest free slot."""
        slot = self._target_slot(slot)
        config, tensors = read_peft_dir(Path(path))
        weights, rank = self._build(config, tensors, str(path))
        info = AdapterInfo(slot, str(path), rank, tuple(sorted(_module_name(self.model, m) for m in weights)))
        self._slots[slot] = _Resident(info, weights, (config, tensors))
        return slot

    def unload(self, slot: int) -> None:
        self._resident(slot)
        del self._slots[slot]

    def fork(self, slot: int, new_slot: int | None = None) -> int:
        """Copy the adapter in `slot` into `new_slot` (or the lowest free slot); the copies are independent."""
        src = self._resident(slot)
        dst = self._target_slot(new_slot)
        weights = {m: LoRAWeights(w.a.clone(), w.b.clone()) for m, w in src.weights.items()}
        config, tensors = src.files
        files = (dict(config), {k: t.clone() for k, t in tensors.items()})
        self._slots[dst] = _Resident(AdapterInfo(dst, src.info.path, src.info.rank, src.info.targets), weights,
                                     files)
        return dst

    def save(self, slot: int, path: str | Path) -> None:
        """Write the adapter in `slot` as a PEFT directory (loadable by PEFT and by `load`)."""
        from safetensors.torch import save_file

        config, tensors = self._resident(slot).files
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(out / WEIGHTS_FILE))

    def info(self, slot: int) -> AdapterInfo:
        return self._resident(slot).info

    def resident(self) -> list[int]:
        return sorted(self._slots)

    def _resident(self, slot: int) -> _Resident:
        if slot not in self._slots:
            raise AdapterError(f"adapter slot {slot} holds no adapter; resident slots: {self.resident() or 'none'}")
        return self._slots[slot]

    def _target_slot(self, slot: int | None) -> int:
        if slot is not None:
            if not 0 <= slot < self.max_slots:
                raise AdapterError(f"adapter slot {slot} is out of range: max_num_adapters = {self.max_slots} "
                                   f"gives slots 0..{self.max_slots - 1}; raise max_num_adapters")
            return slot
        free = next((s for s in range(self.max_slots) if s not in self._slots), None)
        if free is None:
            raise AdapterError(f"all {self.max_slots} adapter slots are in use; unload an adapter or raise "
                               f"max_num_adapters (now {self.max_slots})")
        return free

    # -- per batch --

    def batch(self, adapters: Sequence[int | None], qo_indptr: np.ndarray) -> LoRABatch | None:
        """Requests' adapter slots -> the batch's LoRA groups (None when no request uses one).

        qo_indptr: [R + 1] request r owns token rows qo_indptr[r]:qo_indptr[r + 1].
        Raises BatchError for a slot that holds no adapter, before any device work.
        """
        if all(a is None for a in adapters):
            return None
        rows_of: dict[int, list[np.ndarray]] = {}
        for r, a in enumerate(adapters):
            if a is None:
                continue
            if a not in self._slots:
                raise BatchError(f"request {r} uses adapter slot {a}, which holds no adapter; load one there first "
                                 f"(resident slots: {self.resident() or 'none'})")
            rows_of.setdefault(a, []).append(np.arange(qo_indptr[r], qo_indptr[r + 1]))
        num_rows = int(qo_indptr[-1])
        groups = []
        for a, parts in rows_of.items():
            rows = np.concatenate(parts)
            rows_dev = None if len(rows) == num_rows else torch.from_numpy(rows).to(self.device)
            groups.append(LoRAGroup(self._slots[a].weights, rows_dev))
        return LoRABatch(groups)

    # -- building an adapter's weights --

    def _build(self, config: dict[str, Any], tensors: dict[str, torch.Tensor],
               source: str) -> tuple[dict[nn.Module, LoRAWeights], int]:
        pairs = _lora_pairs(tensors, source)
        rank = max(a.shape[0] for a, _ in pairs.values())
        if rank > self.max_rank:
            raise AdapterError(f"adapter {source} has rank {rank}, over max_adapter_rank = {self.max_rank}; "
                               f"raise max_adapter_rank to at least {rank}")
        parts: dict[Linear, list[tuple[slice, torch.Tensor, torch.Tensor]]] = {}
        for module_name, (a, b) in pairs.items():
            linear, rows = self._target(module_name, source)
            if a.shape[1] != linear.in_features or b.shape[0] != rows.stop - rows.start or b.shape[1] != a.shape[0]:
                raise AdapterError(f"adapter {source}: {module_name} has lora_A {tuple(a.shape)} / lora_B "
                                   f"{tuple(b.shape)}, which do not fit a [{rows.stop - rows.start} x "
                                   f"{linear.in_features}] projection; was it trained on another model?")
            scale = _scaling(config, module_name, a.shape[0])
            parts.setdefault(linear, []).append((rows, a, b * scale))
        return {m: self._stack(m, p) for m, p in parts.items()}, rank

    def _target(self, module_name: str, source: str) -> tuple[Linear, slice]:
        """PEFT module name -> (our Linear, its output rows): q_proj is the q shard of a fused qkv_proj."""
        mapped = self.model.map_checkpoint_name(module_name + ".weight")
        name = (mapped or module_name).removesuffix(".weight")
        shard = None
        for src, (dst, shard_id) in self.model.packed_modules_mapping.items():
            if name.endswith(f".{src}"):
                name, shard = name.removesuffix(src) + dst, shard_id
                break
        try:
            module = self.model.get_submodule(name)
        except AttributeError:
            module = None
        if not isinstance(module, Linear):
            raise AdapterError(f"adapter {source} targets {module_name!r}, which is not a projection pie applies "
                               f"LoRA to (q/k/v/o, gate/up/down and the fused qkv_proj / gate_up_proj)")
        rows = module.shard_rows(shard) if shard is not None else slice(0, module.out_features)
        return module, rows

    def _stack(self, linear: Linear, parts: list[tuple[slice, torch.Tensor, torch.Tensor]]) -> LoRAWeights:
        """One (a [R, in], b [out, R]) pair for all the shards an adapter targets on one Linear."""
        total = sum(a.shape[0] for _, a, _ in parts)
        a_all = torch.cat([a for _, a, _ in parts]).to(self.device, self.dtype)
        b_all = torch.zeros(linear.out_features, total, device=self.device, dtype=self.dtype)
        col = 0
        for rows, a, b in parts:
            b_all[rows, col:col + a.shape[0]] = b.to(self.device, self.dtype)
            col += a.shape[0]
        return LoRAWeights(a_all, b_all)


def read_peft_dir(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """adapter_config.json + adapter_model.safetensors, checked for options pie cannot apply."""
    from safetensors.torch import load_file

    if not (path / CONFIG_FILE).is_file():
        raise AdapterError(f"{path} is not a PEFT adapter directory: {CONFIG_FILE} is missing")
    if not (path / WEIGHTS_FILE).is_file():
        raise AdapterError(f"{path} has no {WEIGHTS_FILE}; pie loads safetensors adapters only "
                           "(re-save with save_pretrained(..., safe_serialization=True))")
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path} is a {config.get('peft_type')} adapter; pie applies LoRA adapters only")
    used = [k for k in _UNSUPPORTED_OPTIONS if config.get(k)]
    if used:
        raise AdapterError(f"{path} uses PEFT option(s) {', '.join(used)}, which pie does not implement; "
                           "train a plain LoRA adapter (these options off)")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{path} trains biases (bias = {config['bias']!r}); pie applies LoRA A/B only, "
                           "use bias = 'none'")
    return config, load_file(str(path / WEIGHTS_FILE))


def _lora_pairs(tensors: dict[str, torch.Tensor], source: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT tensor names -> {module name (base model naming): (A [r, in], B [out, r])}."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _LORA_KEY.match(key.removeprefix(_PEFT_PREFIX))
        if m is None:
            raise AdapterError(f"adapter {source} has tensor {key!r}, which is not a LoRA A/B matrix "
                               "(embedding LoRA, DoRA magnitudes or saved modules are not supported)")
        found.setdefault(m["module"], {})[m["ab"]] = t.float()
    if not found:
        raise AdapterError(f"adapter {source} contains no LoRA weights")
    pairs = {}
    for name, ab in found.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter {source}: {name} has lora_{''.join(ab)} but not both A and B")
        pairs[name] = (ab["A"], ab["B"])
    return pairs


def _scaling(config: dict[str, Any], module_name: str, rank: int) -> float:
    """PEFT's per-module scaling: alpha / r (rsLoRA: alpha / sqrt(r)), rank_pattern / alpha_pattern applied."""
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    key = next((k for k in [*rank_pattern, *alpha_pattern] if re.match(rf"(.*\.)?({k})$", module_name)), None)
    r = rank_pattern.get(key, config.get("r", rank))
    alpha = alpha_pattern.get(key, config.get("lora_alpha", r))
    return float(alpha / (math.sqrt(r) if config.get("use_rslora") else r))


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)
