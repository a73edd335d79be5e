"""Tensor parallelism as `pie serve` runs it: a model whose group spans two ranks is served by worker
processes (gloo on CPU), and inferlets answer exactly as on one device."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pie.engine.config import EngineConfig
from pie.runtime.runtime import ModelSpec, Runtime, RuntimeConfig
from pie.runtime.worker_client import WorkerEngine
from pie.tiny_model import ensure_tiny_model

PROMPTS = ("Count to three.", "Name a colour.", "Say hi")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("pie-home"))


async def complete(model_dir: Path, **engine: object) -> tuple[list[str], list[int]]:
    """text-completion on every prompt at once; the outputs and the worker pids (none in-process)."""
    config = EngineConfig(model=str(model_dir), device="cpu", max_num_kv_pages=64, activation_dtype="float32",
                          **engine)  # type: ignore[arg-type]
    runtime = await Runtime.start(RuntimeConfig((ModelSpec("tiny", config),), pie_home=model_dir.parents[2]))
    try:
        client = runtime.model().groups[0].engine
        pids = client.pids if isinstance(client, WorkerEngine) else []
        procs = [await runtime.launch("text-completion", json.dumps({"prompt": p, "max_tokens": 16}),
                                      username="u") for p in PROMPTS]
        finals = [await p.wait() for p in procs]
    finally:
        await runtime.shutdown(0)
    assert [f.kind for f in finals] == ["return"] * len(PROMPTS), finals
    return [str(f.value) for f in finals], pids


async def test_a_tensor_parallel_group_serves_inferlets_like_one_device(tiny: Path) -> None:
    expected, _ = await complete(tiny)
    got, pids = await complete(tiny, tensor_parallel_size=2)
    assert len(pids) == 2 and os.getpid() not in pids  # one worker process per rank
    assert got == expected
    for pid in pids:  # shutdown stopped the workers
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
