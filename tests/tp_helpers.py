"""Tensor-parallel worker groups for the tests: two gloo ranks on CPU, driven synchronously."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pie.engine.batch import BatchResult, ForwardBatch
from pie.engine.config import EngineConfig
from pie.engine.info import EngineInfo
from pie.runtime.worker_client import WorkerEngine

ENGINE = {"device": "cpu", "max_num_kv_pages": 256, "kv_page_size": 4}


class SyncWorkers:
    """A WorkerEngine driven synchronously, so the engine_helpers that drive an Engine drive it too."""

    def __init__(self, engine: WorkerEngine) -> None:
        self.engine = engine
        self.info: EngineInfo = engine.info

    def forward_batch(self, batch: ForwardBatch) -> BatchResult:
        return asyncio.run(self.engine.forward(batch))

    def copy_pages(self, src: list[int], dst: list[int]) -> None:
        asyncio.run(self.engine.copy_pages(src, dst))

    def close(self) -> None:
        asyncio.run(self.engine.close())


def tp_config(model_dir: Path, **overrides: Any) -> EngineConfig:
    return EngineConfig(model=str(model_dir), tensor_parallel_size=2, **{**ENGINE, **overrides})


def start_local(model_dir: Path, **overrides: Any) -> SyncWorkers:
    return SyncWorkers(asyncio.run(WorkerEngine.start(tp_config(model_dir, **overrides), ["cpu", "cpu"], "tp")))
