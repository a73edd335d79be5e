"""Safetensors checkpoint -> model parameters, with strict name and shape checks.

The model is built on the meta device under the target dtype (no memory, no
init cost), materialised on the device, then filled tensor by tensor from the
(possibly sharded) safetensors files. Every parameter must be loaded exactly
once and every checkpoint tensor must land somewhere (or match the model's
`ignored_checkpoint_keys`); anything else is a `CheckpointError` naming the
tensor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from pie.engine.layers.linear import Linear
from pie.engine.models.decoder import CausalLM
from pie.engine.parallel import SINGLE, TPGroup
from pie.engine.tensor_source import FileTensor, LoadsSlices, ReadCounter, TensorSource
from pie.errors import CheckpointError

ProgressFn = Callable[[int, int], None]  # (tensors loaded, tensors total)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(cls: type[CausalLM], hf_config: object, dtype: torch.dtype, device: torch.device,
                tp: TPGroup = SINGLE) -> CausalLM:
    """Instantiate on meta under `dtype`, then allocate (uninitialised) on `device`; `tp` ranks hold slices."""
    with default_dtype(dtype), torch.device("meta"):
        model = cls(hf_config, tp)
    model = model.to_empty(device=device)
    model.eval()
    return model


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {model_dir}; pie loads safetensors checkpoints only")
    return files


def iter_checkpoint(files: list[Path], counter: ReadCounter) -> Iterator[FileTensor]:
    """Every tensor of `files`, unread; each file stays open while its tensors are consumed."""
    from safetensors import safe_open

    for f in files:
        if not f.exists():
            raise CheckpointError(f"checkpoint shard {f} listed in the index is missing")
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield FileTensor(fh, key, counter)


def count_tensors(files: list[Path]) -> int:
    from safetensors import safe_open

    total = 0
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            total += len(list(fh.keys()))
    return total


class _Target:
    """Where one checkpoint tensor goes: a parameter, maybe one shard of a fused Linear."""

    __slots__ = ("attr", "module", "param_name", "shard")

    def __init__(self, module: nn.Module, attr: str, param_name: str, shard: int | None) -> None:
        self.module, self.attr, self.param_name, self.shard = module, attr, param_name, shard


def _resolve(model: CausalLM, name: str) -> _Target | None:
    target_name, shard = name, None
    for src, (dst, shard_id) in model.packed_modules_mapping.items():
        if f".{src}." in name:
            target_name, shard = name.replace(f".{src}.", f".{dst}."), shard_id
            break
    module_path, _, attr = target_name.rpartition(".")
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        return None
    if not isinstance(getattr(module, attr, None), nn.Parameter):
        return None
    if isinstance(module, Linear) and shard is None:
        shard = 0
    return _Target(module, attr, target_name, shard)


def load_weights(model: CausalLM, files: list[Path], progress: ProgressFn | None = None) -> int:
    """Fill every parameter of `model` from `files`; strict about names and shapes. Returns the bytes read.

    Modules that hold a tensor-parallel slice (`LoadsSlices`) read only their rank's block of a tensor;
    everything else, and every tensor at tp = 1, is read whole.
    """
    ignored = [re.compile(p) for p in model.ignored_checkpoint_keys]
    tied = model.spec.tie_word_embeddings
    expected = _expected_slots(model)
    loaded: set[tuple[str, int | None]] = set()
    total = count_tensors(files) if progress else 0
    counter = ReadCounter()
    for i, source in enumerate(iter_checkpoint(files, counter)):
        if progress:
            progress(i + 1, total)
        name = model.map_checkpoint_name(source.key)  # multimodal wrappers rename the text part, skip the rest
        if name is None:
            continue
        if any(p.search(name) for p in ignored) or (tied and name == "lm_head.weight"):
            continue
        if name != source.key:
            source = FileTensor(source.handle, source.key, counter, name=name)
        custom = model.load_custom_weight(name, source)
        if custom is not None:
            loaded |= set(custom)
            continue
        target = _resolve(model, name)
        if target is None:
            raise CheckpointError(f"unexpected tensor {name!r} in the checkpoint: no parameter of "
                                  f"{type(model).__name__} takes it (wrong model_type, or a corrupt checkpoint?)")
        _copy_into(target, source)
        loaded.add((target.param_name, target.shard))
    missing = sorted(expected - loaded, key=str)
    if missing:
        names = [_source_name(model, p, s) for p, s in missing[:5]]
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint is missing tensor(s) {', '.join(names)}{more}")
    for module in model.modules():
        if isinstance(module, Linear):
            module.finalize()
    return counter.bytes_read


def _copy_into(target: _Target, source: TensorSource) -> None:
    if isinstance(target.module, LoadsSlices):  # tensor-parallel slices read only their rank's block
        target.module.load_slice(target.attr, source, target.shard)
        return
    tensor = source.full()
    if isinstance(target.module, Linear):
        assert target.shard is not None
        target.module.load_shard(target.attr, tensor, target.shard, source.name)
        return
    param = getattr(target.module, target.attr)
    if tuple(tensor.shape) != tuple(param.shape):
        raise CheckpointError(f"tensor {source.name!r} has shape {tuple(tensor.shape)}, "
                              f"expected {tuple(param.shape)} for this architecture")
    param.data.copy_(tensor)


def _expected_slots(model: CausalLM) -> set[tuple[str, int | None]]:
    slots: set[tuple[str, int | None]] = set()
    for mod_name, module in model.named_modules():
        for attr, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{attr}" if mod_name else attr
            if isinstance(module, Linear):
                slots |= {(full, s) for s in range(len(module.shard_sizes))}
            else:
                slots.add((full, None))
    return slots


def _source_name(model: CausalLM, param_name: str, shard: int | None) -> str:
    """The checkpoint name that fills (param_name, shard), for error messages."""
    for src, (dst, sid) in model.packed_modules_mapping.items():
        if sid == shard and f".{dst}." in param_name:
            return param_name.replace(f".{dst}.", f".{src}.")
    return param_name


def init_dummy_weights(model: CausalLM, seed: int = 0) -> None:
    """Deterministic random weights of the right shapes (benchmarks; `dummy_weights = true`)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            param.data.fill_(1.0 if getattr(_owner(model, name), "offset", 0.0) == 0.0 else 0.0)
        else:
            cpu = torch.randn(param.shape, generator=gen, dtype=torch.float32) * 0.02
            param.data.copy_(cpu)
    for module in model.modules():
        if isinstance(module, Linear):
            module.finalize()


def _owner(model: nn.Module, param_name: str) -> nn.Module:
    return model.get_submodule(param_name.rpartition(".")[0])
