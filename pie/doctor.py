"""`pie doctor`: is this machine ready to serve? Each check says ok, warn or fail, and what to fix.

Only a failing check that stops `pie serve` (no torch, an invalid config, a configured device this
machine lacks, a configured model this engine cannot run or this machine cannot obtain, auth on
with nobody authorized) makes the command exit 1. The hub is probed with a 2 s TCP connect: offline
is a warning (cached, local and built-in models still run), not a failure.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pie.errors import PieError


@dataclass(frozen=True)
class Check:
    level: str  # "ok" | "warn" | "fail"
    text: str
    blocking: bool = False  # a failure that stops `pie serve`


def run_checks(config_path: Path | None) -> list[Check]:
    checks: list[Check] = []
    for step in (_python, _torch, _gpu, _flashinfer, _flavor):
        checks += list(step())
    from pie.model_source import hub_offline, hub_unreachable

    hub_problem = "HF_HUB_OFFLINE is set" if hub_offline() else hub_unreachable()
    checks += [_hub(hub_problem), _cache()]
    checks += list(_config(config_path, hub_problem))
    checks += list(_sandbox_layers(config_path))
    return checks


def _hub(problem: str | None) -> Check:
    from pie.model_source import hub_endpoint, hub_offline

    if problem is None:
        return Check("ok", f"Hugging Face hub {hub_endpoint()} reachable (models not cached are downloaded)")
    if hub_offline():
        return Check("ok", "HF_HUB_OFFLINE is set: only cached, local and built-in models (no downloads)")
    return Check("warn", f"offline: {problem}. Cached, local and built-in (pie/tiny-random) models still run; "
                 "to download, connect, or set HF_ENDPOINT to a reachable mirror (HTTPS_PROXY for a proxy)")


def _cache() -> Check:
    from huggingface_hub import constants

    from pie.cli.catalog import cached_repos, gib

    cache = Path(constants.HF_HUB_CACHE)
    existing = next((p for p in (cache, *cache.parents) if p.exists()), cache)
    if not os.access(existing, os.W_OK):
        return Check("warn", f"Hugging Face cache {cache}: {existing} is not writable, so downloads fail; "
                     "set HF_HOME (or HF_HUB_CACHE) to a writable folder")
    repos = cached_repos(cache) if cache.is_dir() else []
    size = sum(r.size_on_disk for r in repos)
    return Check("ok", f"Hugging Face cache {cache}: {len(repos)} model(s), {gib(size)}"
                 + ("" if repos else " (nothing downloaded yet)"))


def _python() -> Iterator[Check]:
    version = ".".join(map(str, sys.version_info[:3]))
    yield (Check("ok", f"python {version} ({sys.executable})") if sys.version_info >= (3, 11)
           else Check("fail", f"python {version}: pie needs 3.11 or newer", blocking=True))


def _torch() -> Iterator[Check]:
    try:
        import torch
    except ImportError as error:
        yield Check("fail", f"torch does not import ({error}); reinstall pie with install.sh", blocking=True)
        return
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    yield Check("ok", f"torch {torch.__version__} ({build}); device: {_device_summary(torch)}")


def _device_summary(torch: Any) -> str:
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"cuda ({', '.join(names)})"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _gpu() -> Iterator[Check]:
    try:
        import pynvml
    except ImportError:
        yield Check("warn", "nvidia-ml-py is not installed: cannot read the NVIDIA driver; pip install nvidia-ml-py")
        return
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        yield Check("ok", "no NVIDIA driver: models run on CPU (or Apple MPS)")
        return
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()
        gpus = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        memory = [pynvml.nvmlDeviceGetMemoryInfo(g).total / 2**30 for g in gpus]
        yield Check("ok", f"NVIDIA driver {_text(driver)} (CUDA {cuda // 1000}.{cuda % 1000 // 10}), "
                    f"{len(gpus)} GPU(s): " + ", ".join(f"{m:.0f} GiB" for m in memory))
    finally:
        pynvml.nvmlShutdown()
    yield from _torch_sees_gpus(len(gpus))


def _torch_sees_gpus(num_gpus: int) -> Iterator[Check]:
    try:
        import torch
    except ImportError:
        return
    if num_gpus and not torch.cuda.is_available():
        yield Check("warn", f"{num_gpus} NVIDIA GPU(s) but torch cannot use CUDA ({torch.__version__}); "
                    "reinstall with the CUDA flavor that matches the driver (install.sh picks it)")


def _flashinfer() -> Iterator[Check]:
    found = importlib.util.find_spec("flashinfer") is not None
    if found:
        yield Check("ok", "flashinfer importable (CUDA attention kernels)")
        return
    cuda = _cuda_available()
    yield Check("warn" if cuda else "ok", "flashinfer missing: CUDA attention uses the slower torch_ref kernels; "
                "install the `cuda` extra" if cuda else "flashinfer not installed (not used without CUDA)")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _flavor() -> Iterator[Check]:
    try:
        from pie.flavors import installed_flavor
    except ImportError:
        yield Check("warn", "pie.flavors is missing from this install; cannot tell its flavor")
        return
    from pie.config import pie_home

    try:
        flavor = installed_flavor(pie_home())
    except PieError as error:
        yield Check("warn", f"flavor: {error}")
        return
    if flavor is None:
        yield Check("ok", "no recorded flavor (a pip or source install, not install.sh)")
        return
    yield Check("ok", f"flavor {flavor.name}: {flavor.description}")


def _config(config_path: Path | None, hub_problem: str | None) -> Iterator[Check]:
    from pie.config import load_config

    try:
        config = load_config(config_path)
    except PieError as error:
        yield Check("fail", f"config: {error}", blocking=True)
        return
    yield Check("ok", f"config {config.source or '(none: built-in defaults)'} loads: "
                f"{', '.join(m.name for m in config.models)}")
    for note in config.notes:
        yield Check("warn", f"config: {note}")
    for index, model in enumerate(config.models):
        yield from _devices(index, model.name, model.device)
        yield from _model(model.hf_repo, model.revision or None, hub_problem)
    if config.enable_auth:
        yield _keystore(config.pie_home)


def _keystore(home: Path) -> Check:
    from pie.auth import open_keystore

    try:
        store = open_keystore(home)
    except PieError as error:
        return Check("fail", f"auth: {error}", blocking=True)
    return Check("ok", f"auth on: {len(store.users())} user(s) in {store.path}")


def _devices(index: int, name: str, devices: tuple[str, ...]) -> Iterator[Check]:
    """Each configured device exists here: `cuda:1` needs two CUDA devices, `mps` Apple's GPU."""
    try:
        import torch
    except ImportError:
        return  # reported by _torch
    num_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = False
    for device in devices:
        kind, _, number = device.partition(":")
        if kind == "cuda" and int(number or 0) >= num_cuda:
            have = f"{num_cuda} CUDA device(s)" if num_cuda else f"no CUDA device (torch {torch.__version__}" + \
                (", a CPU build)" if not torch.version.cuda else ")")
            yield Check("fail", f"model {name}: device {device} is configured but this machine has {have}; "
                        f"use `pie config set model.{index}.device '[\"cpu\"]'` (or \"auto\"), or install "
                        "the CUDA flavor on a machine with an NVIDIA GPU", blocking=True)
            missing = True
        elif kind == "mps" and not torch.backends.mps.is_available():
            yield Check("fail", f"model {name}: device mps is configured but Apple's GPU (MPS) is not available "
                        f"here; use `pie config set model.{index}.device '[\"cpu\"]'` (or \"auto\")",
                        blocking=True)
            missing = True
    if not missing:
        yield Check("ok", f"model {name}: device {', '.join(devices)} available")


def _model(name: str, revision: str | None, hub_problem: str | None) -> Iterator[Check]:
    from pie.cli.catalog import device_memory, inspect_checkpoint
    from pie.model_source import resolve_model_dir
    from pie.tiny_model import TINY_MODEL_ID

    if name == TINY_MODEL_ID:  # resolving it would generate its files; a check writes nothing
        yield Check("ok", f"model {name}: built in (random weights, for trying pie out)")
        return

    try:
        path = resolve_model_dir(name, revision=revision, download=False)
    except PieError as missing:
        if Path(name).expanduser().is_dir() or name.count("/") != 1 or name.startswith(("/", ".", "~")):
            yield Check("fail", f"model {name}: {missing}", blocking=True)
        elif hub_problem is None:
            yield Check("warn", f"model {name} is not in the cache: `pie serve` downloads it on start, or fetch "
                        f"it now with `pie model download {name}`")
        else:
            from pie.model_source import unavailable_message

            yield Check("fail", unavailable_message(name, hub_problem), blocking=True)
        return
    facts = inspect_checkpoint(name, path, device_memory())
    if facts.problem is None:
        yield Check("ok", f"model {name}: {facts.model_type}, runnable ({path})")
    elif facts.problem_kind == "memory":  # an estimate: worth a warning, not a refusal
        yield Check("warn", f"model {name}: {facts.problem}")
    else:
        yield Check("fail", f"model {name}: {facts.problem}", blocking=True)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _sandbox_layers(config_path: Path | None) -> Iterator[Check]:
    """Isolated mode's OS sandbox layers on this host (found by starting one sandbox). A missing layer
    fails (and stops `pie serve`) only when the config asks for isolated mode without allow_weaker."""
    from pie.config import load_config
    from pie.runtime.isolation import effective_isolation
    from pie.runtime.sandbox.layers import probe
    from pie.runtime.sandbox.policy import SandboxPolicy

    try:
        config = load_config(config_path)
    except PieError:
        policy = None  # the config check above already reports it
    else:  # "auto" is isolated on a multi-user server
        isolated = effective_isolation(config) == "isolated"
        policy = (config.runtime.sandbox or SandboxPolicy()) if isolated else None
    strict = policy is not None and not policy.allow_weaker
    used = "isolated" if policy is not None else "not used: isolation = trusted"
    for layer in probe():
        if layer.present:
            yield Check("ok", f"sandbox layer {layer.name}: {layer.detail}")
        else:
            yield Check("fail" if strict else "warn", f"sandbox layer {layer.name} missing ({used}): {layer.detail}; "
                        f"fix: {layer.fix}, or set [sandbox] allow_weaker = true", blocking=strict)
