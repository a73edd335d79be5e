"""`pie model`, `pie doctor` and `pie driver` against real files: a Hugging Face cache laid out as
huggingface_hub lays it out (blobs, refs, snapshot symlinks), real safetensors headers, real interpreters."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from pie.cli.catalog import DeviceMemory, gib, inspect_checkpoint
from pie.cli.driver_env import resolve_python
from pie.cli.main import app
from pie.config import ModelOptions
from pie.tiny_model import ensure_tiny_model

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, input: str | None = None) -> Any:
    return CliRunner().invoke(app, list(args), input=input)


def header_only_safetensors(tensors: dict[str, tuple[str, list[int]]]) -> bytes:
    """A safetensors file's header (shapes and dtypes); pie reads only this to count parameters."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = 2 * int(sum(shape))  # data offsets are not checked by a header read
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


def cache_repo(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """One model repo as huggingface_hub stores it: content-addressed blobs, refs/main, snapshot symlinks."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = commit_of(repo_id)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def commit_of(repo_id: str) -> str:
    return hashlib.sha1(repo_id.encode()).hexdigest()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("pie-home"))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PIE_HOME", str(tmp_path / "pie-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "pie-home"


@pytest.fixture
def cache(tmp_path: Path, tiny_dir: Path) -> Path:
    cache = tmp_path / "hf-cache"
    cache_repo(cache, "acme/tiny-qwen3", {p.name: p.read_bytes() for p in tiny_dir.iterdir() if p.is_file()})
    cache_repo(cache, "acme/next", {"config.json": b'{"model_type": "qwen3_next"}',
                                    "model.safetensors": header_only_safetensors({"w": ("BF16", [4, 4])})})
    cache_repo(cache, "acme/strange", {"config.json": b'{"model_type": "strange_lm"}',
                                       "model.safetensors": header_only_safetensors({"w": ("BF16", [4, 4])})})
    cache_repo(cache, "acme/huge", {"config.json": b'{"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}',
                                    "model.safetensors": header_only_safetensors({"w": ("BF16", [2**20, 2**20])})})
    cache_repo(cache, "acme/tokenizer-only", {"tokenizer.json": b"{}"})
    return cache


def test_facts_come_from_the_headers(tiny_dir: Path) -> None:
    facts = inspect_checkpoint("tiny", tiny_dir, DeviceMemory("cpu", 2**34))
    arrays = load_file(str(tiny_dir / "model.safetensors"))
    assert facts.num_params == sum(a.size for a in arrays.values())
    assert (facts.model_type, facts.architecture, facts.checkpoint_dtype, facts.problem) == \
        ("qwen3", "Qwen3ForCausalLM", "F32", None)
    assert facts.estimated_bytes == int(facts.num_params * 4 * 1.2)
    gpu = inspect_checkpoint("tiny", tiny_dir, DeviceMemory("cuda:0", 2**34), weight_dtype="int4")
    assert gpu.estimated_bytes == int(facts.num_params * 0.5 * 1.2)
    small = inspect_checkpoint("tiny", tiny_dir, DeviceMemory("cpu", 1024))
    assert small.problem_kind == "memory" and "needs about" in (small.problem or "")


def test_model_list_marks_what_runs_here_and_why_not(home: Path, cache: Path) -> None:
    result = cli("model", "list", "--cache-dir", str(cache))
    assert result.exit_code == 0, result.output
    lines = {line.split()[1]: line for line in result.output.splitlines()[1:]}
    assert list(lines) == ["pie/tiny-random", "acme/huge", "acme/next", "acme/strange", "acme/tiny-qwen3",
                           "acme/tokenizer-only"]
    assert lines["pie/tiny-random"].startswith("✓") and "qwen3 (Qwen3ForCausalLM), built in" in lines["pie/tiny-random"]
    assert not (home / "models").exists()  # listing writes nothing
    assert lines["acme/tiny-qwen3"].startswith("✓") and "F32" in lines["acme/tiny-qwen3"]
    # A hybrid (transformers' Qwen3-Next defaults): runnable, with its recurrent state per sequence.
    assert lines["acme/next"].startswith("✓") and "recurrent state per sequence" in lines["acme/next"]
    assert "not supported by this engine (no implementation)" in lines["acme/strange"]
    assert lines["acme/huge"].startswith("○") and "needs about 4915.2 GiB on " in lines["acme/huge"]  # 2^40 x 4 B x 1.2
    assert lines["acme/tokenizer-only"].startswith("○") and "no config.json" in lines["acme/tokenizer-only"]


def test_model_info(home: Path, cache: Path, tiny_dir: Path) -> None:
    info = cli("model", "info", "acme/tiny-qwen3", "--cache-dir", str(cache))
    assert info.exit_code == 0
    fields = dict(line.split(":", 1) for line in info.output.splitlines())
    assert fields["architecture"].strip() == "Qwen3ForCausalLM (model_type qwen3)"
    assert fields["supported"].strip() == "yes" and fields["dtype"].strip() == "F32 (as stored)"
    assert fields["path"].strip().endswith(f"snapshots/{commit_of('acme/tiny-qwen3')}")
    params = sum(a.size for a in load_file(str(tiny_dir / "model.safetensors")).values())
    assert fields["parameters"].strip().startswith(f"{params:,} (")
    hybrid = dict(line.split(":", 1) for line in cli("model", "info", "acme/next", "--cache-dir", str(cache))
                  .output.splitlines())
    assert hybrid["supported"].strip() == "yes"
    # 36 Gated DeltaNet layers x (32 heads x 128 x 128 float32 state + 8192 conv channels x 3 inputs), the conv
    # window in the activation dtype (float32 on a CPU, the checkpoint's bf16 on a GPU).
    state = {36 * (32 * 128 * 128 * 4 + 8192 * 3 * conv) for conv in (4, 2)}
    assert any(hybrid["state"].strip() == f"{gib(b)} per sequence ({b:,} bytes of recurrent state, whatever its "
               "length; on top of its KV pages)" for b in state), hybrid["state"]
    why = cli("model", "info", "acme/strange", "--cache-dir", str(cache))
    assert "supported:    no: model_type 'strange_lm' is not supported" in why.output
    assert cli("model", "info", str(tiny_dir)).exit_code == 0  # a checkpoint folder
    assert "supported:    yes" in cli("model", "info", "pie/tiny-random").output
    missing = cli("model", "info", "acme/missing", "--cache-dir", str(cache))
    assert missing.exit_code == 1 and "fetch it with `pie model download acme/missing`" in missing.output


def test_model_remove_asks_first(home: Path, cache: Path) -> None:
    declined = cli("model", "remove", "acme/strange", "--cache-dir", str(cache), input="n\n")
    assert declined.exit_code == 1 and (cache / "models--acme--strange").exists()
    removed = cli("model", "remove", "acme/strange", "--cache-dir", str(cache), "--yes")
    assert removed.exit_code == 0 and removed.output.startswith("removed acme/strange (")
    assert not (cache / "models--acme--strange").exists()
    assert "acme/strange" not in cli("model", "list", "--cache-dir", str(cache)).output
    assert cli("model", "remove", "acme/strange", "--cache-dir", str(cache), "--yes").exit_code == 1


def test_model_download_offline_says_what_to_do(home: Path) -> None:
    for command in ("download", "add"):
        result = cli("model", command, "acme/not-here")
        assert result.exit_code == 1
        assert "error: model 'acme/not-here' is not in the Hugging Face cache and could not be downloaded" in \
            result.output


def write_config(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(text)


def test_doctor_passes_on_a_good_setup(home: Path, tiny_dir: Path) -> None:
    # An uncached model: warned about or failed depending on the hub (tests/test_cli_first_run.py).
    write_config(home, '[[model]]\nhf_repo = "pie/tiny-random"\ndevice = ["cpu"]\n'
                       f'[[model]]\nhf_repo = "{tiny_dir}"\n')
    result = cli("doctor")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("  ok  python 3.") and lines[1].startswith("  ok  torch ")
    assert any(line.startswith("  ok  model pie/tiny-random: built in") for line in lines)
    assert not (home / "models").exists()  # checking writes nothing
    assert f"  ok  model {tiny_dir}: qwen3, runnable ({tiny_dir})" in lines


@pytest.mark.parametrize(("config", "expected"), [
    ("[[model]]\nkv_page_size = 0\n", "fail  config: "),
    ('enable_auth = true\n[[model]]\nhf_repo = "pie/tiny-random"\n', "fail  auth: enable_auth is on but"),
])
def test_doctor_fails_on_what_stops_serving(home: Path, config: str, expected: str) -> None:
    write_config(home, config)
    result = cli("doctor")
    assert result.exit_code == 1
    assert any(line.startswith(expected) for line in result.output.splitlines())


def test_doctor_fails_on_an_unsupported_configured_model(home: Path, tmp_path: Path) -> None:
    model = tmp_path / "next"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "strange_lm"}')
    (model / "model.safetensors").write_bytes(header_only_safetensors({"w": ("BF16", [2, 2])}))
    write_config(home, f'[[model]]\nhf_repo = "{model}"\n')
    result = cli("doctor")
    assert result.exit_code == 1 and f"fail  model {model}: model_type 'strange_lm'" in result.output


# -- pie driver ----------------------------------------------------------------------------------------

def test_driver_install_prints_its_plan_and_runs_nothing(home: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venvs" / "dev"
    result = cli("driver", "dev", "install", str(venv))
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].startswith("# flavor ") or lines[0].startswith("# no flavor")
    assert lines[1] == f"{sys.executable} -m venv {venv}"
    assert lines[2].startswith(f"{venv}/bin/python -m pip install torch")
    assert lines[3] == f"{venv}/bin/python -m pip install {REPO}" or lines[3].startswith(f"{venv}/bin/python -m pip install {REPO}[")
    assert lines[-1] == "# these were not run; add --run to run them" and not venv.exists()


def test_driver_set_show_and_the_lookup_order(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = cli("driver", "dev", "set", "venv", str(tmp_path / "nope"))
    assert missing.exit_code == 1 and "no python interpreter at" in missing.output
    monkeypatch.setenv("PIE_PYTHON", "/opt/py/bin/python3")
    assert resolve_python().source == "$PIE_PYTHON"
    assert cli("driver", "dev", "set", "python", sys.executable).exit_code == 0
    assert tomllib.loads((home / "driver.toml").read_text()) == {"dev": {"python": sys.executable}}
    chosen = resolve_python()
    assert chosen.python == Path(sys.executable) and chosen.source.startswith("`pie driver dev set python`")
    own = resolve_python(ModelOptions(venv="/srv/venv"))
    assert (own.python, own.source) == (Path("/srv/venv/bin/python"), "the model's `venv` option")
    write_config(home, '[[model]]\nhf_repo = "pie/tiny-random"\nvenv = "/srv/venv"\n')
    shown = cli("driver", "dev", "show").output.splitlines()
    assert shown == [f"stored: python = {sys.executable}",
                     "pie/tiny-random: /srv/venv/bin/python (from the model's `venv` option)"]
    assert "cuda_native  not in this pie" in cli("driver", "list").output


def test_driver_doctor_runs_the_chosen_interpreter(home: Path) -> None:
    assert cli("driver", "dev", "set", "python", sys.executable).exit_code == 0
    result = cli("driver", "dev", "doctor")
    assert result.exit_code == 0, result.output
    assert f"  ok  python {sys.version.split()[0]}" in result.output
    assert "  ok  torch 2." in result.output and "  ok  pie's engine imports" in result.output
    false = shutil.which("false")
    assert false is not None and cli("driver", "dev", "set", "python", false).exit_code == 0
    broken = cli("driver", "dev", "doctor")
    assert broken.exit_code == 1 and "failed" in broken.output


def test_model_list_and_info_say_which_inputs_a_checkpoint_serves(home: Path, tmp_path: Path) -> None:
    """Gemma 3, Gemma 4 and Qwen 3.5 image-text checkpoints: text+image; a Gemma 4 with an audio tower:
    text+image+audio; a text-only one: text."""
    from checkpoints import tiny_checkpoint
    from vision_support import gemma4_checkpoint

    def inputs(path: Path) -> str:
        return dict(line.split(":", 1) for line in cli("model", "info", str(path)).output.splitlines())["inputs"]

    assert inputs(tiny_checkpoint(tmp_path / "gemma3", "gemma3")).strip() == "text+image"
    assert inputs(tiny_checkpoint(tmp_path / "gemma4", "gemma4")).strip() == "text+image"
    assert inputs(gemma4_checkpoint(tmp_path / "gemma4-audio", audio=True)).strip() == "text+image+audio"
    assert inputs(tiny_checkpoint(tmp_path / "qwen3_5", "qwen3_5")).strip() == "text+image"
    tiny = dict(line.split(":", 1) for line in cli("model", "info", "pie/tiny-random").output.splitlines())
    assert tiny["inputs"].strip() == "text"
