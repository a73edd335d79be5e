"""Shared fixtures. GPU tests are skipped where CUDA is not available."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A factory: checkpoint_dir(model_type, **overrides) -> a cached tiny random checkpoint."""
    from checkpoints import tiny_checkpoint

    cache: dict[str, object] = {}

    def make(model_type: str = "qwen3", **overrides: object):  # type: ignore[no-untyped-def]
        key = f"{model_type}-{sorted(overrides.items())}"
        if key not in cache:
            d = tmp_path_factory.mktemp(model_type)
            cache[key] = tiny_checkpoint(d, model_type, **overrides)
        return cache[key]

    return make
