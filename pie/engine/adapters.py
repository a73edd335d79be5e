"""Resident LoRA adapters: a table of `max_num_adapters` slots filled from PEFT directories.

    table = AdapterTable(model, max_slots=32, max_rank=8, device, dtype)
    slot = table.load("/path/to/peft_dir")        # adapter_config.json + adapter_model.safetensors
    lora = table.batch([slot, None, slot], qo_indptr)   # per-request slots -> LoRABatch for the forward pass
    table.unload(slot)

Zeroth-order training (`pie.engine.zo`): `zo_initialize` gives a slot an evolution-strategy state (and,
for a slot without weights, a fresh adapter), `batch(..., zo_seeds)` runs a request with the adapter
theta + sigma * eps(seed), and `zo_update` moves theta by the ES update. A perturbed copy is materialised
per distinct (slot, seed) of a batch in a scratch slot: the table's free slots, at most
`max_num_adapters - resident` of them, kept (least recently used first out) so a decoding rollout
does not redraw its noise every step.

Loading validates everything (files, PEFT options, rank, target modules,
shapes) before touching the table, so a refused adapter leaves the engine as
it was. Each adapter's scaling (lora_alpha / r, or / sqrt(r) with rsLoRA, with
PEFT's rank_pattern / alpha_pattern) is folded into its B matrices.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pie.engine.layers.linear import Linear
from pie.engine.layers.lora import LoRABatch, LoRAGroup, LoRAWeights
from pie.engine.models.decoder import CausalLM
from pie.engine.zo import ZoState, perturbation
from pie.errors import AdapterError, BatchError

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
# PEFT options whose math pie does not implement: refuse rather than silently compute something else.
# The projections a fresh zo adapter targets (PEFT's "all-linear" without the LM head).
_ZO_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ZO_INIT_SEED = 0
_SEED_MOD = 1 << 64  # lora_A of a fresh zo adapter: PEFT's kaiming-uniform init, from this fixed seed
_UNSUPPORTED_OPTIONS = ("use_dora", "lora_bias", "modules_to_save", "layer_replication", "trainable_token_indices",
                        "target_parameters", "use_qalora", "alora_invocation_tokens")


@dataclass(frozen=True)
class AdapterInfo:
    slot: int
    path: str
    rank: int  # the largest rank of any targeted module
    targets: tuple[str, ...]  # the model's Linear modules it updates


# Per targeted Linear: (its output rows, the lora_A key, the lora_B key, the scaling) of each PEFT module.
_Layout = dict[Linear, list[tuple[slice, str, str, float]]]


@dataclass
class _Resident:
    info: AdapterInfo
    weights: dict[nn.Module, LoRAWeights]
    files: tuple[dict[str, Any], dict[str, torch.Tensor]]  # the PEFT config and tensors, for save / fork
    layout: _Layout = field(default_factory=dict)
    zo: ZoState | None = None
    theta: dict[str, torch.Tensor] | None = None  # zo: the PEFT tensors as float32 on the device


class AdapterTable:
    def __init__(self, model: CausalLM, max_slots: int, max_rank: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.model, self.max_slots, self.max_rank = model, max_slots, max_rank
        self.device, self.dtype = device, dtype
        self._slots: dict[int, _Resident] = {}
        # Perturbed copies of zo adapters by (slot, seed), least recently used first: the scratch slots.
        self._scratch: OrderedDict[tuple[int, int], dict[nn.Module, LoRAWeights]] = OrderedDict()

    # -- slot management --

    def load(self, path: str | Path, slot: int | None = None) -> int:
        """Load a PEFT LoRA directory into `slot` (replacing what it held) or the lowest free slot."""
        slot = self._target_slot(slot)
        config, tensors = read_peft_dir(Path(path))
        self._place(slot, str(path), config, tensors)
        return slot

    def _place(self, slot: int, source: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        layout, rank = self._layout(config, tensors, source)
        weights = self._weights(layout, tensors)
        info = AdapterInfo(slot, source, rank, tuple(sorted(_module_name(self.model, m) for m in weights)))
        self._forget_scratch(slot)
        self._slots[slot] = _Resident(info, weights, (config, tensors), layout)

    def unload(self, slot: int) -> None:
        self._resident(slot)
        self._forget_scratch(slot)
        del self._slots[slot]

    def fork(self, slot: int, new_slot: int | None = None) -> int:
        """Copy the adapter in `slot` into `new_slot` (or the lowest free slot); the copies are independent."""
        src = self._resident(slot)
        dst = self._target_slot(new_slot)
        weights = {m: LoRAWeights(w.a.clone(), w.b.clone()) for m, w in src.weights.items()}
        config, tensors = src.files
        files = (dict(config), {k: t.clone() for k, t in tensors.items()})
        self._forget_scratch(dst)
        self._slots[dst] = _Resident(AdapterInfo(dst, src.info.path, src.info.rank, src.info.targets), weights,
                                     files, src.layout, src.zo.clone() if src.zo is not None else None,
                                     {k: t.clone() for k, t in src.theta.items()} if src.theta is not None else None)
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

    def batch(self, adapters: Sequence[int | None], qo_indptr: np.ndarray,
              zo_seeds: Sequence[int | None] | None = None) -> LoRABatch | None:
        """Requests' adapter slots (and zo seeds) -> the batch's LoRA groups (None when no request uses one).

        qo_indptr: [R + 1] request r owns token rows qo_indptr[r]:qo_indptr[r + 1].
        zo_seeds: per request, None or the seed of its adapter's perturbation (the slot must have a zo state).
        Raises BatchError for a slot that holds no adapter, a zo seed without a zo adapter, or more distinct
        (slot, seed) perturbations than scratch slots, before any device work.
        """
        if all(a is None for a in adapters):  # a zo seed without an adapter: refused by `validate` already
            return None
        rows_of: dict[tuple[int, int | None], list[np.ndarray]] = {}
        for r, a in enumerate(adapters):
            z = zo_seeds[r] if zo_seeds is not None else None
            if z is not None:
                z = int(z) % _SEED_MOD  # seeds equal mod 2**64 are one perturbation (and one scratch slot)
            if a is None:
                if z is not None:
                    raise BatchError(f"request {r} has a zo_seed but no adapter: a zo seed perturbs the pass's "
                                     "adapter")
                continue
            if a not in self._slots:
                raise BatchError(f"request {r} uses adapter slot {a}, which holds no adapter; load one there first "
                                 f"(resident slots: {self.resident() or 'none'})")
            if z is not None and self._slots[a].zo is None:
                raise BatchError(f"request {r} has a zo_seed for adapter slot {a}, which has no zo state; "
                                 "zo.initialize the adapter first")
            rows_of.setdefault((a, z), []).append(np.arange(qo_indptr[r], qo_indptr[r + 1]))
        perturbed = [key for key in rows_of if key[1] is not None]
        spare = self.max_slots - len(self._slots)
        if len(perturbed) > spare:
            raise BatchError(f"batch has {len(perturbed)} distinct (adapter, zo_seed) perturbations, over the "
                             f"{spare} scratch adapter slots (max_num_adapters = {self.max_slots} minus "
                             f"{len(self._slots)} resident adapters); batch fewer seeds or raise max_num_adapters")
        num_rows = int(qo_indptr[-1])
        groups = []
        for (a, z), parts in rows_of.items():
            rows = np.concatenate(parts)
            rows_dev = None if len(rows) == num_rows else torch.from_numpy(rows).to(self.device)
            weights = self._slots[a].weights if z is None else self._perturbed(a, z)
            groups.append(LoRAGroup(weights, rows_dev))
        self._trim_scratch(spare)
        return LoRABatch(groups)

    # -- zeroth-order training (pie.engine.zo) --

    def zo_initialize(self, slot: int | None, rank: int, alpha: float, population_size: int, mu_fraction: float,
                      initial_sigma: float) -> int:
        """Give `slot` an ES state; a slot without an adapter (or None: the lowest free one) first gets a fresh
        rank-`rank` adapter on every attention and MLP projection (lora_A kaiming-uniform, lora_B zero, so it
        starts as the base model). A resident adapter keeps its weights and must have that rank and alpha.
        Returns the slot."""
        state = ZoState.create(population_size, mu_fraction, initial_sigma)
        if type(rank) is not int or not 1 <= rank <= self.max_rank:
            raise AdapterError(f"zo rank must be an integer in [1, max_adapter_rank = {self.max_rank}], got {rank!r}")
        if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
            raise AdapterError(f"zo alpha must be a finite number > 0 (the LoRA scaling is alpha / rank), got {alpha!r}")
        if slot is not None and slot in self._slots:
            res = self._slots[slot]
            config = res.files[0]
            have = (int(config.get("r", res.info.rank)), float(config.get("lora_alpha", config.get("r", 0))))
            if have != (rank, float(alpha)) or config.get("rank_pattern") or config.get("alpha_pattern"):
                raise AdapterError(f"zo.initialize(rank={rank}, alpha={alpha}) on an adapter with rank {have[0]} "
                                   f"and alpha {have[1]:g} (from {res.info.path}); pass its own rank and alpha to "
                                   "evolve it from its weights, or initialize a new adapter")
        else:
            slot = self._target_slot(slot)
            config, tensors = self._fresh(rank, float(alpha))
            self._place(slot, f"zo adapter (rank {rank}, alpha {alpha:g})", config, tensors)
        res = self._slots[slot]
        res.zo = state
        res.theta = {k: t.to(self.device, torch.float32, copy=True) for k, t in res.files[1].items()}
        self._forget_scratch(slot)
        return slot

    def zo_update(self, slot: int, scores: Sequence[float], seeds: Sequence[int], max_sigma: float) -> None:
        """One ES generation on the adapter in `slot` (see `pie.engine.zo`); its weights change in place."""
        res = self._resident(slot)
        if res.zo is None or res.theta is None:
            raise AdapterError(f"adapter slot {slot} has no zo state; zo.initialize it first")
        res.zo.update(res.theta, list(scores), list(seeds), max_sigma)
        tensors = res.files[1]  # what save / fork read
        for k, t in res.theta.items():
            tensors[k] = t.to("cpu", tensors[k].dtype)
        res.weights = self._weights(res.layout, res.theta)
        self._forget_scratch(slot)

    def zo_state(self, slot: int) -> ZoState | None:
        return self._resident(slot).zo

    def theta(self, slot: int) -> dict[str, torch.Tensor]:
        """The adapter's PEFT tensors as float32 on the device (a copy)."""
        res = self._resident(slot)
        source = res.theta if res.theta is not None else res.files[1]
        return {k: t.to(self.device, torch.float32, copy=True) for k, t in source.items()}

    def _perturbed(self, slot: int, seed: int) -> dict[nn.Module, LoRAWeights]:
        """The weights of theta + sigma * eps(seed), from the scratch slots or materialised into one."""
        key = (slot, seed)
        weights = self._scratch.get(key)
        if weights is not None:
            self._scratch.move_to_end(key)
            return weights
        res = self._slots[slot]
        assert res.zo is not None and res.theta is not None
        eps = perturbation({k: t.shape for k, t in res.theta.items()}, seed, self.device)
        sigma = res.zo.sigma
        weights = self._weights(res.layout, {k: t + sigma * eps[k] for k, t in res.theta.items()})
        self._scratch[key] = weights
        return weights

    def _trim_scratch(self, capacity: int) -> None:
        while len(self._scratch) > capacity:
            self._scratch.popitem(last=False)

    def _forget_scratch(self, slot: int) -> None:
        for key in [k for k in self._scratch if k[0] == slot]:
            del self._scratch[key]

    def _fresh(self, rank: int, alpha: float) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """A PEFT config and tensors for a new rank-`rank` adapter on every attention and MLP projection."""
        unfused = {dst: [src for src, (d, _) in sorted(self.model.packed_modules_mapping.items(),
                                                         key=lambda kv: kv[1][1]) if d == dst]
                   for dst, _ in self.model.packed_modules_mapping.values()}
        gen = torch.Generator().manual_seed(_ZO_INIT_SEED)
        tensors: dict[str, torch.Tensor] = {}
        targets: set[str] = set()
        for name, module in self.model.named_modules():
            if not isinstance(module, Linear) or not re.search(r"\.(self_attn|mlp)\.[a-z_]+$", name):
                continue
            parent, _, leaf = name.rpartition(".")
            for proj in unfused.get(leaf, [leaf]):
                if proj not in _ZO_TARGETS:
                    continue
                rows = module.shard_rows(unfused[leaf].index(proj)) if leaf in unfused else slice(0, module.out_features)
                bound = 1.0 / math.sqrt(module.in_features)  # kaiming_uniform_(a=sqrt(5)), as PEFT does
                key = f"{_PEFT_PREFIX}{parent}.{proj}"
                tensors[f"{key}.lora_A.weight"] = (torch.rand(rank, module.in_features, generator=gen) * 2 - 1) * bound
                tensors[f"{key}.lora_B.weight"] = torch.zeros(rows.stop - rows.start, rank)
                targets.add(proj)
        if not tensors:
            raise AdapterError("this model has no attention or MLP projection a zo adapter could target")
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": sorted(targets),
                  "bias": "none", "lora_dropout": 0.0, "task_type": "CAUSAL_LM"}
        return config, tensors

    # -- building an adapter's weights --

    def _layout(self, config: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> tuple[_Layout, int]:
        """Where each PEFT module's A and B go in the model's Linears, checked; and the adapter's largest rank."""
        pairs = _lora_pairs(tensors, source)
        rank = max(tensors[ka].shape[0] for ka, _ in pairs.values())
        if rank > self.max_rank:
            raise AdapterError(f"adapter {source} has rank {rank}, over max_adapter_rank = {self.max_rank}; "
                               f"raise max_adapter_rank to at least {rank}")
        layout: _Layout = {}
        for module_name, (ka, kb) in pairs.items():
            a, b = tensors[ka], tensors[kb]
            linear, rows = self._target(module_name, source)
            if a.shape[1] != linear.in_features or b.shape[0] != rows.stop - rows.start or b.shape[1] != a.shape[0]:
                raise AdapterError(f"adapter {source}: {module_name} has lora_A {tuple(a.shape)} / lora_B "
                                   f"{tuple(b.shape)}, which do not fit a [{rows.stop - rows.start} x "
                                   f"{linear.in_features}] projection; was it trained on another model?")
            layout.setdefault(linear, []).append((rows, ka, kb, _scaling(config, module_name, a.shape[0])))
        return layout, rank

    def _weights(self, layout: _Layout, tensors: dict[str, torch.Tensor]) -> dict[nn.Module, LoRAWeights]:
        """The engine's (a, b) pairs of an adapter whose PEFT tensors are `tensors`, scaling folded into b."""
        return {m: self._stack(m, [(rows, tensors[ka].float(), tensors[kb].float() * scale)
                                   for rows, ka, kb, scale in parts])
                for m, parts in layout.items()}

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


def _lora_pairs(tensors: dict[str, torch.Tensor], source: str) -> dict[str, tuple[str, str]]:
    """PEFT tensor names -> {module name (base model naming): (its lora_A key, its lora_B key)}."""
    found: dict[str, dict[str, str]] = {}
    for key in tensors:
        m = _LORA_KEY.match(key.removeprefix(_PEFT_PREFIX))
        if m is None:
            raise AdapterError(f"adapter {source} has tensor {key!r}, which is not a LoRA A/B matrix "
                               "(embedding LoRA, DoRA magnitudes or saved modules are not supported)")
        found.setdefault(m["module"], {})[m["ab"]] = key
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
