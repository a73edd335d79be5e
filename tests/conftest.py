"""Shared fixtures. GPU tests are skipped where CUDA is not available.

Isolation (tests/isolation.py): from the start of the run every process sees a temporary HOME,
PIE_HOME and Hugging Face cache, and each test gets fresh ones of its own; at the end the run
fails if the real ~/.pie or ~/.cache/huggingface changed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import isolation  # first: it records the environment before anything below patches it
import pytest

_session: dict[str, object] = {}


def pytest_configure(config: pytest.Config) -> None:
    """Patch the environment for the whole run before any test module, fixture or subprocess reads it
    (huggingface_hub reads HF_HOME once, on import)."""
    base = Path(tempfile.mkdtemp(prefix="pie-tests-"))
    _session["base"] = base
    _session["watched"] = isolation.watched_dirs()
    _session["before"] = isolation.snapshot(_session["watched"])  # type: ignore[arg-type]
    for key in isolation.HF_OVERRIDES:
        os.environ.pop(key, None)
    os.environ.update(isolation.homes_env(base / "session"))
    # Built kernels (cpu_paged) once per run, shared by every test, instead of once per test's PIE_HOME.
    os.environ["TORCH_EXTENSIONS_DIR"] = str(base / "torch_extensions")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if anything wrote into the real pie home or Hugging Face cache."""
    if "before" not in _session:
        return
    after = isolation.snapshot(_session["watched"])  # type: ignore[arg-type]
    changed = isolation.changes(_session["before"], after)  # type: ignore[arg-type]
    if not changed:
        return
    shown = "\n  ".join(changed[:20]) + (f"\n  ... and {len(changed) - 20} more" if len(changed) > 20 else "")
    message = (f"the tests wrote outside their temp dirs, into the real pie home / Hugging Face cache:\n  {shown}\n"
               "give the code under test a PIE_HOME / HF_HOME (the conftest's own_homes fixture does) or tmp_path")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_sep("=", "real home touched", red=True)
        reporter.write_line(message)
    else:
        print(message)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config: pytest.Config) -> None:
    base = _session.pop("base", None)
    if isinstance(base, Path):
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(autouse=True)
def own_homes(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """This test's HOME, PIE_HOME and Hugging Face cache, fresh and empty (not under tmp_path, whose
    listing some tests check). Yields the temporary HOME."""
    env = isolation.homes_env(tmp_path_factory.mktemp("homes"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield Path(env["HOME"])


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
