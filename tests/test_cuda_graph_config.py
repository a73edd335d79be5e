"""CUDA graphs are on in the configs a CUDA flavor writes (`pie config init`, install.sh), off by the schema's
default and elsewhere; an engine that cannot replay graphs says why and decodes eagerly; the GPU check script
(bench/gpu_check.sh) is clean and stops at once without a GPU."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from engine_helpers import make_engine
from test_install import installer_env, run_installer, tool_dir
from typer.testing import CliRunner

from pie.cli.main import app
from pie.config import ModelOptions, load_config
from pie.engine.batch import ForwardBatch, OutputSpec, Request, Sampler
from pie.flavors import FLAVOR_FILE, load_flavors

REPO = Path(__file__).resolve().parent.parent
FLAVORS = load_flavors(REPO / "flavors")


def _init(home: Path, monkeypatch: pytest.MonkeyPatch, flavor: str | None, device: str) -> Path:
    monkeypatch.setenv("PIE_HOME", str(home))
    monkeypatch.delenv("PIE_INSTALLED_FLAVOR", raising=False)
    home.mkdir(parents=True, exist_ok=True)
    if flavor is not None:
        (home / FLAVOR_FILE).write_text(flavor + "\n")
    result = CliRunner().invoke(app, ["config", "init", "--device", device])
    assert result.exit_code == 0, result.output
    return home / "config.toml"


@pytest.mark.parametrize("flavor", sorted(FLAVORS))
def test_config_init_turns_graphs_on_for_a_cuda_flavor_with_flashinfer(tmp_path: Path, flavor: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    f = FLAVORS[flavor]
    path = _init(tmp_path / "home", monkeypatch, flavor, f.device)
    model = load_config(path).models[0]
    expected = f.device.startswith("cuda") and f.has_flashinfer
    assert model.options.use_cuda_graphs is expected, path.read_text()
    assert ("use_cuda_graphs = true" in path.read_text()) is expected


def test_config_init_on_a_cpu_device_leaves_graphs_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _init(tmp_path / "home", monkeypatch, "cuda12.8", "cpu")  # a CUDA flavor, but the config names the CPU
    assert "use_cuda_graphs" not in path.read_text()
    assert not load_config(path).models[0].options.use_cuda_graphs
    assert ModelOptions().use_cuda_graphs is False  # the schema default stays off


@pytest.mark.parametrize("flavor", sorted(FLAVORS))
def test_install_sh_writes_graphs_on_for_a_flavor_with_flashinfer(tmp_path: Path, flavor: str) -> None:
    env = installer_env(tmp_path, tool_dir(tmp_path), PIE_FLAVOR=flavor)
    result = run_installer(env, "--print-config")
    assert result.returncode == 0, result.stderr
    config = tomllib.loads(result.stdout)
    model = config["model"][0]
    assert model["device"] == [FLAVORS[flavor].device]
    assert model.get("use_cuda_graphs", False) is FLAVORS[flavor].has_flashinfer
    written = tmp_path / "config.toml"
    written.write_text(result.stdout)
    assert load_config(written).models[0].options.use_cuda_graphs is FLAVORS[flavor].has_flashinfer


def test_an_engine_that_cannot_replay_graphs_says_why_and_decodes(checkpoint_dir,  # type: ignore[no-untyped-def]
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pie.engine.engine"):
        engine = make_engine(checkpoint_dir("qwen3"), use_cuda_graphs=True, max_num_kv_pages=16)
    assert engine.graphs is None
    assert "torch_ref on cpu" in caplog.text and "run eagerly" in caplog.text
    out = engine.forward_batch(ForwardBatch([Request(tokens=[1, 2], positions=[0, 1], page_ids=[0], last_page_len=2,
                                                     outputs=[OutputSpec(1, Sampler())])])).outputs
    assert isinstance(out[0][0], int)


def test_the_gpu_check_script_is_shellcheck_clean_and_stops_without_a_gpu() -> None:
    script = REPO / "bench" / "gpu_check.sh"
    if shutil.which("shellcheck") is not None:
        lint = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True, check=False)
        assert lint.returncode == 0, lint.stdout
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check itself is the way to run it (about 8 minutes)")
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 1 and done.stdout.startswith("RESULT gpu_check=no_gpu"), done.stdout + done.stderr
