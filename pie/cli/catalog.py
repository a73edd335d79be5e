"""What `pie model` and `pie doctor` know about checkpoints, without loading a weight.

A checkpoint's facts come from its `config.json` (model_type, architecture) and the headers of its
`*.safetensors` files (tensor shapes and dtypes: parameter count and weight bytes). It is runnable
when this engine implements its `model_type` and its weights, at the dtype the engine would load
them in, fit the device's memory with a margin.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pie.tiny_model import TINY_MODEL_ID

MARGIN = 1.2  # weights x MARGIN must fit: activations, KV pages and the CUDA context need room too
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 0.5}
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "float8": 1, "int4": 0.5}
_MAX_HEADER = 100 * 1024 * 1024  # a safetensors header larger than this is not one


@dataclass(frozen=True)
class DeviceMemory:
    device: str  # "cuda:0", "mps" or "cpu"
    total_bytes: int


@dataclass(frozen=True)
class ModelFacts:
    name: str
    path: Path | None
    model_type: str | None
    architecture: str | None
    num_params: int
    checkpoint_dtype: str  # the dtype most parameters are stored in ("BF16"), "" when unknown
    estimated_bytes: int  # weights as the engine would hold them on `memory.device`, times MARGIN
    problem: str | None  # why it cannot run here; None = runnable
    problem_kind: str = ""  # "files" (not a usable checkpoint), "architecture", "memory" (an estimate)
    modalities: tuple[str, ...] = ("text",)  # the inputs pie serves for it
    unserved: tuple[str, ...] = ()  # inputs the checkpoint has towers for that pie does not run
    # Hybrid models (Qwen 3.5, Qwen3-Next, Nemotron-H): one sequence's recurrent state, whatever its length,
    # on top of its KV pages (the engine's state pool holds one slot per live sequence); 0 for dense models.
    state_bytes_per_sequence: int = 0

    @property
    def runnable(self) -> bool:
        return self.problem is None


def device_memory() -> DeviceMemory:
    """The first NVIDIA GPU's memory (nvidia-ml-py), else this machine's RAM (CPU and Apple MPS)."""
    gpu = _nvml_total()
    if gpu is not None:
        return DeviceMemory("cuda:0", gpu)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return DeviceMemory("mps" if sys.platform == "darwin" else "cpu", ram)


def _nvml_total() -> int | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver, no GPU: the CPU path
        return None
    try:
        if pynvml.nvmlDeviceGetCount() == 0:
            return None
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total)
    finally:
        pynvml.nvmlShutdown()


def inspect_checkpoint(name: str, path: Path, memory: DeviceMemory, weight_dtype: str = "auto") -> ModelFacts:
    """Facts and verdict for the checkpoint folder `path` (holding config.json and *.safetensors)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        return ModelFacts(name, path, None, None, 0, "", 0, "no config.json: not a model checkpoint", "files")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return ModelFacts(name, path, None, None, 0, "", 0, f"config.json is unreadable ({error})", "files")
    model_type = config.get("model_type")
    architecture = (config.get("architectures") or [None])[0]
    params, dtypes, problem = _weights(path)
    stored = dtypes.most_common(1)[0][0] if dtypes else ""
    estimate = int(params * _bytes_per_param(memory.device, stored, weight_dtype) * MARGIN)
    kinds = (("files", problem), ("architecture", _support_problem(model_type)),
             ("memory", _memory_problem(estimate, memory)))
    kind, reason = next(((k, p) for k, p in kinds if p is not None), ("", None))
    served, unserved = modalities(model_type, config)
    state = _state_bytes(path, memory.device, stored, weight_dtype) if kind in ("", "memory") else 0
    return ModelFacts(name, path, model_type, architecture, params, stored, estimate, reason, kind, served, unserved,
                      state)


def modalities(model_type: str | None, config: dict[str, object]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(inputs pie serves, inputs the checkpoint has a tower for that pie does not run) from config.json."""
    from pie.engine.vision import serves_audio, serves_images

    has = [m for m, key in (("image", "vision_config"), ("audio", "audio_config")) if config.get(key)]
    served: tuple[str, ...] = ("text", "image") if model_type and serves_images(model_type) and "image" in has else ("text",)
    if "image" in served and "audio" in has and serves_audio(str(model_type)):
        served += ("audio",)  # the engine runs an audio tower beside a vision one (`VisionEncoder.load`)
    return served, tuple(m for m in has if m not in served)


def _state_bytes(path: Path, device: str, stored: str, weight_dtype: str) -> int:
    """A hybrid family's recurrent state per sequence (the engine's `StateShape.bytes_per_slot`), 0 for the rest.

    The conv window is held in the activation dtype (float32 on a CPU, the checkpoint's on a GPU), the
    recurrent state in float32. Read through transformers' config class, as the engine reads it.
    """
    from transformers import AutoConfig

    from pie.engine.models.registry import get_architecture

    try:
        hf_config = AutoConfig.from_pretrained(str(path))
        spec = get_architecture(str(hf_config.model_type)).decoder_spec(hf_config)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0  # the architecture check has said what is wrong, or the family keeps no state
    state_shape = getattr(spec, "state_shape", None)
    if state_shape is None:
        return 0
    import torch

    wide = device == "cpu" or weight_dtype == "float32" or stored == "F32"
    return int(state_shape(torch.float32 if wide else torch.bfloat16).bytes_per_slot)


def _weights(path: Path) -> tuple[int, Counter[str], str | None]:
    """(parameter count, parameters per stored dtype, problem) from the safetensors headers."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return 0, Counter(), "no *.safetensors weights (pie loads safetensors checkpoints only)"
    params, dtypes = 0, Counter[str]()
    for file in files:
        try:
            for dtype, shape in safetensors_header(file):
                count = math.prod(shape)
                params += count
                dtypes[dtype] += count
        except (OSError, ValueError) as error:
            return params, dtypes, f"{file.name} is not a readable safetensors file ({error})"
    return params, dtypes, None


def safetensors_header(file: Path) -> Iterator[tuple[str, list[int]]]:
    """(dtype, shape) of every tensor in `file`: 8 bytes of little-endian header length, then JSON."""
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_HEADER:
            raise ValueError(f"header length {length} is implausible")
        header = json.loads(f.read(length))
    for name, entry in header.items():
        if name != "__metadata__":
            yield entry["dtype"], entry["shape"]


def _bytes_per_param(device: str, stored: str, weight_dtype: str) -> float:
    """As the engine holds weights: float32 on CPU, the checkpoint's dtype on a GPU, unless
    weight_dtype says otherwise (float16/bfloat16/float32, or a quantized int8/int4/float8)."""
    if weight_dtype in _DTYPE_BYTES:
        return _DTYPE_BYTES[weight_dtype]
    if device == "cpu":
        return 4
    return _SAFETENSORS_BYTES.get(stored, 2)


def _support_problem(model_type: str | None) -> str | None:
    if not model_type:
        return "config.json names no model_type"
    from pie.engine.models.registry import unsupported_reason

    return unsupported_reason(model_type)


def _memory_problem(estimate: int, memory: DeviceMemory) -> str | None:
    if estimate <= memory.total_bytes:
        return None
    return (f"needs about {gib(estimate)} on {memory.device}, which has {gib(memory.total_bytes)}; "
            "use a smaller model or a quantized weight_dtype (int8, int4)")


def gib(num_bytes: float) -> str:
    """Bytes for people: 1.4 GiB, 410.0 MiB, 12.0 KiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{int(num_bytes)} B"


def human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


# -- the Hugging Face cache ------------------------------------------------------------------------

@dataclass(frozen=True)
class CachedRepo:
    repo_id: str
    snapshot: Path  # the revision `main` points to, else the newest one
    size_on_disk: int
    revisions: tuple[str, ...]  # commit hashes


def cached_repos(cache_dir: Path | None = None) -> list[CachedRepo]:
    """The model repos in the Hugging Face cache (huggingface_hub's location unless `cache_dir`)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return []
    out = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        main = [r for r in repo.revisions if "main" in r.refs]
        chosen = main[0] if main else max(repo.revisions, key=lambda r: r.last_modified)
        out.append(CachedRepo(repo.repo_id, chosen.snapshot_path, repo.size_on_disk,
                              tuple(sorted(r.commit_hash for r in repo.revisions))))
    return out


def delete_repo(repo_id: str, cache_dir: Path | None = None) -> int:
    """Delete a model repo's folder from the cache (every revision, its blobs and refs; what
    huggingface_hub's own delete strategy does when all revisions go); returns the bytes freed."""
    from huggingface_hub import scan_cache_dir

    from pie.errors import ModelNotFoundError

    repo = next((r for r in scan_cache_dir(cache_dir).repos if r.repo_id == repo_id and r.repo_type == "model"), None)
    if repo is None:
        raise ModelNotFoundError(f"{repo_id} is not in the Hugging Face cache; `pie model list` shows what is")
    shutil.rmtree(repo.repo_path)
    return repo.size_on_disk


def builtin_model(memory: DeviceMemory, *, generate: bool = False) -> ModelFacts:
    """pie/tiny-random, always runnable. Its files are generated on first use; without `generate`
    this only looks (listing and checking write nothing)."""
    from pie.tiny_model import TINY_CONFIG, ensure_tiny_model, tiny_model_dir

    directory = tiny_model_dir()
    if generate:
        directory = ensure_tiny_model()
    if (directory / "model.safetensors").is_file():
        return inspect_checkpoint(TINY_MODEL_ID, directory, memory)
    return ModelFacts(TINY_MODEL_ID, None, TINY_CONFIG["model_type"], TINY_CONFIG["architectures"][0], 0, "", 0,
                      None)
