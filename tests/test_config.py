"""config.toml -> Config: both documented styles, defaults, every refusal naming file, key and fix,
round-trips through `config show`, `pie config set` edits, and the objects the server and runtime read."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pie.config import (
    DEFAULT_MODEL,
    Config,
    McpConfig,
    McpServerConfig,
    ModelConfig,
    ModelOptions,
    RuntimeConfig,
    ServerConfig,
    TelemetryConfig,
    load_config,
    parse_config,
)
from pie.config_io import default_config_text, parse_scalar, set_key
from pie.engine.config import EngineConfig
from pie.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SEEDS = Path("/work/shared/seeds")
SEED_000_EXAMPLE = '''
# Pie Server Configuration
host = "0.0.0.0" # Listen on all interfaces
port = 8080
enable_auth = true
# Small model on single GPU
[[model]]
hf_repo = "Qwen/Qwen3-0.6B"
device = ["cuda:0"]
tensor_parallel_size = 1
activation_dtype = "bfloat16"
weight_dtype = "bfloat16"
kv_page_size = 16
max_batch_tokens = 10240
# Large model with 4-way tensor parallelism
[[model]]
hf_repo = "meta-llama/Llama-3.1-70B"
device = ["cuda:1", "cuda:2", "cuda:3", "cuda:4"]
tensor_parallel_size = 4
activation_dtype = "bfloat16"
weight_dtype = "bfloat16"
kv_page_size = 16
max_batch_tokens = 8192
# Memory and resource limits
gpu_mem_utilization = 0.85
max_num_embeds = 256
max_dist_size = 64
# Adapter settings
max_num_adapters = 64
max_adapter_rank = 16
adapter_path = "/data/pie/adapters/"
# Telemetry
[telemetry]
enabled = true
endpoint = "http://otel-collector:4317"
service_name = "pie-production"
'''
SEED_002_DEV = '''
[model.driver]
type = "dev"
device = ["cuda:0"]
tensor_parallel_size = 1
activation_dtype = "bfloat16"

[model.driver.options]
venv = "/home/me/.pie/venvs/dev"
gpu_mem_utilization = 0.8
max_batch_tokens = 10240
max_batch_size = 512
max_dist_size = 32
max_num_embeds = 128
max_num_adapters = 32
max_adapter_rank = 8
kv_page_size = 16
weight_dtype = "auto"
cpu_mem_budget_in_gb = 0
'''
SEED_002_CUDA_NATIVE = '''
[model.driver]
type = "cuda_native"
device = ["cuda:0"]
tensor_parallel_size = 1
activation_dtype = "bfloat16"

[model.driver.options]
gpu_mem_utilization = 0.85
kv_page_size = 32
max_batch_tokens = 10240
max_batch_size = 512
max_num_kv_pages = 1024
swap_pool_size = 0
weight_dtype = "bfloat16"
runtime_quant = ""
ready_timeout_s = 600.0
shutdown_timeout_s = 5.0
binary_path = "/opt/pie/driver"
'''


def parse(text: str, home: Path = Path("/pie-home")) -> Config:
    return parse_config(tomllib.loads(text), source=Path("/etc/pie/config.toml"), home=home)


def refusal(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    return str(caught.value)


@pytest.mark.skipif(not SEEDS.is_dir(), reason="the seed documents are not on this machine")
def test_the_seed_examples_are_the_ones_tested() -> None:
    seed_000 = next(SEEDS.glob("000_*.txt")).read_text()
    seed_002 = next(SEEDS.glob("002_*.txt")).read_text()
    assert all(line.split("#")[0].strip() in seed_000 for line in SEED_000_EXAMPLE.splitlines())
    for example in (SEED_002_DEV, SEED_002_CUDA_NATIVE.replace("/opt/pie/driver", "")):
        assert all(line.split(" = ")[0] in seed_002 for line in example.splitlines())


def test_no_file_gives_the_documented_defaults_without_importing_torch(tmp_path: Path) -> None:
    code = ("import sys; from pie.config import load_config; c = load_config(); "
            "print(c.source, c.host, c.port, c.enable_auth, c.models[0].hf_repo, c.models[0].device, "
            "c.adapter_path, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PIE_HOME": str(tmp_path)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["None", "127.0.0.1", "8080", "False", DEFAULT_MODEL, "('auto',)", str(tmp_path / "adapters"),
                   "False"]


def test_seed_000_complete_example() -> None:
    config = parse(SEED_000_EXAMPLE)
    assert (config.host, config.port, config.enable_auth) == ("0.0.0.0", 8080, True)
    small, large = config.models
    assert small.name == small.hf_repo == "Qwen/Qwen3-0.6B" and small.device == ("cuda:0",)
    assert (small.activation_dtype, small.options.weight_dtype, small.options.max_batch_tokens) == \
        ("bfloat16", "bfloat16", 10240)
    assert large.tensor_parallel_size == 4 and large.data_parallel_groups() == [["cuda:1", "cuda:2", "cuda:3", "cuda:4"]]
    # TOML puts the keys written after the last [[model]] into that model.
    assert (large.options.gpu_mem_utilization, large.options.max_num_embeds, large.options.max_adapter_rank,
            large.options.adapter_path) == (0.85, 256, 16, "/data/pie/adapters/")
    assert small.options.gpu_mem_utilization == 0.8
    assert config.telemetry == TelemetryConfig(True, "http://otel-collector:4317", "pie-production")
    engine = large.engine_config()  # one copy over 4 ranks: a worker process per device
    assert (engine.tensor_parallel_size, engine.tp_devices, engine.device) == \
        (4, ("cuda:1", "cuda:2", "cuda:3", "cuda:4"), "cuda:1")


def test_seed_002_driver_styles() -> None:
    dev = parse(SEED_002_DEV).models[0]
    assert (dev.driver, dev.device, dev.activation_dtype, dev.options.venv) == \
        ("dev", ("cuda:0",), "bfloat16", "/home/me/.pie/venvs/dev")
    assert dev.name == DEFAULT_MODEL  # no hf_repo: the documented default model
    native = parse(SEED_002_CUDA_NATIVE)
    options = native.models[0].options
    assert (options.kv_page_size, options.max_num_kv_pages, options.ready_timeout_s) == (32, 1024, 600.0)
    assert [n.split(":")[0] for n in native.notes] == ['model.driver.type = "cuda_native"', "model"]
    assert "binary_path is ignored" in native.notes[1]


def test_flat_and_driver_styles_mean_the_same() -> None:
    flat = parse('[[model]]\nhf_repo = "a/b"\ndevice = ["cuda:0", "cuda:1"]\nkv_page_size = 32\n'
                 'activation_dtype = "float16"\nweight_dtype = "int8"\n')
    nested = parse('[[model]]\nhf_repo = "a/b"\n[model.driver]\ndevice = ["cuda:0", "cuda:1"]\n'
                   'activation_dtype = "float16"\n[model.driver.options]\nkv_page_size = 32\nweight_dtype = "int8"\n')
    assert flat.models == nested.models


def test_top_level_engine_keys_are_defaults_for_every_model() -> None:
    config = parse('max_batch_tokens = 4096\nuse_cuda_graphs = true\n'
                   '[[model]]\nhf_repo = "a/b"\n[[model]]\nhf_repo = "c/d"\nmax_batch_tokens = 512\n')
    first, second = config.models
    assert (first.options.max_batch_tokens, second.options.max_batch_tokens) == (4096, 512)
    assert first.options.use_cuda_graphs and second.options.use_cuda_graphs
    assert config.defaults.max_batch_tokens == 4096


def test_data_parallel_groups_follow_the_seed_rule() -> None:
    base = '[[model]]\ndevice = ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]\ntensor_parallel_size = '
    assert parse(base + "2").models[0].data_parallel_groups() == [["cuda:0", "cuda:1"], ["cuda:2", "cuda:3"]]
    model = parse(base + "1").models[0]
    assert model.data_parallel_groups() == [["cuda:0"], ["cuda:1"], ["cuda:2"], ["cuda:3"]]
    assert model.engine_config().device == "cuda:0"
    assert model.engine_config(["cuda:3"]).device == "cuda:3"


def test_engine_config_carries_every_engine_option() -> None:
    model = parse('[[model]]\nhf_repo = "pie/tiny-random"\ndevice = ["cpu"]\nrevision = "v1"\n'
                  'activation_dtype = "float32"\n[model.driver.options]\nkv_page_size = 8\nmax_num_kv_pages = 64\n'
                  'attention_backend = "torch_ref"\nswap_pool_size = 4\n').models[0]
    engine = model.engine_config()
    assert engine == EngineConfig(model="pie/tiny-random", device="cpu", activation_dtype="float32", kv_page_size=8,
                                  max_num_kv_pages=64, attention_backend="torch_ref", swap_pool_size=4, revision="v1")


def test_option_defaults_match_the_engine_and_server_and_runtime() -> None:
    from pie.runtime.runtime import RuntimeLimits
    from pie.server.options import ServerOptions

    engine_fields = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    driver_only = {"venv", "python", "ready_timeout_s", "shutdown_timeout_s", "binary_path", "adapter_path"}
    for f in dataclasses.fields(ModelOptions):
        if f.name not in driver_only:
            assert engine_fields[f.name] == f.default, f.name
    for f in dataclasses.fields(ServerConfig):
        assert getattr(ServerOptions, f.name) == f.default, f.name
    for f in dataclasses.fields(RuntimeLimits):  # the runtime reads these names from [runtime]
        assert getattr(RuntimeConfig, f.name) == f.default, f.name


def test_the_server_and_runtime_read_the_config(tmp_path: Path) -> None:
    from pie.runtime.runtime import runtime_config
    from pie.server.options import ServerOptions

    config = parse('port = 9001\nshutdown_timeout_s = 7\n[telemetry]\nservice_name = "svc"\n'
                   '[server]\nmax_frame_bytes = 1048576\n[runtime]\nmax_pages_per_instance = 32\n'
                   f'inferlet_paths = ["{tmp_path}"]\n[[model]]\nhf_repo = "pie/tiny-random"\ndevice = ["cpu"]\n',
                   home=tmp_path)
    options = ServerOptions.from_config(config)
    assert (options.port, options.shutdown_timeout_s, options.max_frame_bytes, options.telemetry_service_name) == \
        (9001, 7.0, 1048576, "svc")
    runtime = runtime_config(config)
    assert runtime.models[0].name == "pie/tiny-random" and runtime.models[0].engine.device == "cpu"
    assert runtime.limits.max_pages_per_instance == 32
    assert runtime.inferlet_paths == (tmp_path,) and runtime.pie_home == tmp_path


def test_isolation_builds_the_sandbox_policy() -> None:
    config = parse('[runtime]\nisolation = "isolated"\n[sandbox]\nmemory_mb = 1024\nallow_network = true\n'
                   'scratch_root = "/srv/scratch"\n')
    sandbox = config.runtime.sandbox
    assert sandbox is not None
    assert (sandbox.memory_mb, sandbox.allow_network, sandbox.scratch_root) == (1024, True, Path("/srv/scratch"))
    trusted = parse('[runtime]\nisolation = "trusted"\n[sandbox]\nmemory_mb = 1024\n')
    assert trusted.runtime.sandbox is None and "[sandbox] is ignored" in trusted.notes[0]


@pytest.mark.parametrize(("text", "expected"), [
    ("[[model]]\nkv_page_sise = 32", "model[0].kv_page_sise is not a known key; did you mean 'kv_page_size'?"),
    ("prot = 80", "prot is not a known key; did you mean 'port'?"),
    ("[telemetry]\nenable = true", "telemetry.enable is not a known key; did you mean 'enabled'?"),
    ('[[model]]\n[model.driver]\ntipe = "dev"', "model[0].driver.tipe is not a known key; did you mean 'type'?"),
    ('[[model]]\ndevice = ["cuda:0", "cuda:1", "cuda:2"]\ntensor_parallel_size = 2',
     "model[0].tensor_parallel_size = 2 does not divide the 3 device(s)"),
    ("gpu_mem_utilization = 1.5", "gpu_mem_utilization = 1.5 is above the maximum 1.0; use 1.0 or less"),
    ("[[model]]\ngpu_mem_utilization = 0", "model[0].gpu_mem_utilization = 0.0 must be greater than 0.0"),
    ("[[model]]\n[model.driver.options]\nkv_page_size = 0",
     "model[0].driver.options.kv_page_size = 0 is below the minimum 1; use 1 or more (the default is 16)"),
    ("[[model]]\nmax_batch_tokens = -5", "model[0].max_batch_tokens = -5 is below the minimum 1"),
    ('[[model]]\nactivation_dtype = "fp16"', "model[0].activation_dtype = 'fp16' is not one of 'auto', 'float32'"),
    ('weight_dtype = "int3"', "weight_dtype = 'int3' is not one of"),
    ("port = 70000", "port = 70000 is above the maximum 65535"),
    ('port = "8080"', "port = '8080' is a string, not an integer; write an integer, e.g. port = 8080"),
    ("enable_auth = 1", "enable_auth = 1 is an integer, not a boolean"),
    ('[[model]]\ndevice = ["gpu:0"]', "model[0].device[0] = 'gpu:0' is not a device; use \"cuda:N\""),
    ('[[model]]\ndevice = ["cuda:0", "cuda:0"]', "names a device twice"),
    ('[[model]]\ndevice = ["cpu", "cuda:0"]', "several devices must all be cuda:N"),
    ("[[model]]\ndevice = []", "model[0].device is an empty list"),
    ('[[model]]\nhf_repo = "a/b"\n[[model]]\nhf_repo = "a/b"', "model[1].name = 'a/b' is also the name of model[0]"),
    ('[[model]]\nkv_page_size = 8\n[model.driver.options]\nkv_page_size = 16',
     "model[0].kv_page_size is set both here and as model[0].driver.options.kv_page_size"),
    ("shutdown_timeout_s = 1\n[server]\nshutdown_timeout_s = 2", "shutdown_timeout_s is set both at the top level"),
    ('[[model]]\nvenv = "x"\n[[model]]\nname = "b"\nvenv = 3', "model[1].venv = 3 is an integer, not a string"),
    ('venv = "/x"', "venv is not a known key"),  # a per-model key, not a default for all models
    ('[runtime]\nisolation = "jail"', "runtime.isolation = 'jail' is not one of 'auto', 'trusted', 'isolated'"),
    ('[runtime]\nisolation = "isolated"\n[sandbox]\nmemory_mb = 100', "[sandbox] memory_mb = 100 is too small"),
    ("model = 3", "model must be a [[model]] table or a list of them"),
    ("telemetry = 3", "telemetry is an integer, not a table"),
    ('[server]\nallowed_image_urls = ["https://images.example.com"]',
     "[server] allowed_image_urls entry 'https://images.example.com' is not an http(s) URL prefix ending its host"),
    ('[server]\nallowed_image_urls = ["ftp://x/"]', "write e.g. \"https://images.example.com/\""),
    ("[server]\nmax_image_bytes = 0", "server.max_image_bytes = 0 is below the minimum 1"),
    ("[server]\nimage_fetch_timeout_s = 0", "server.image_fetch_timeout_s = 0.0 must be greater than 0.0"),
])
def test_refusals_name_the_file_the_key_and_the_fix(text: str, expected: str) -> None:
    message = refusal(text)
    assert message.startswith("/etc/pie/config.toml: ")
    assert expected in message


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "config.toml"
    bad.write_text('host = "x"\nport = \n')
    with pytest.raises(ConfigError, match=rf"{bad}: not valid TOML \(.*line 2"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such file; create one with `pie config init --config"):
        load_config(tmp_path / "missing.toml")


def test_pie_home_moves_the_whole_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIE_HOME", str(tmp_path))
    (tmp_path / "config.toml").write_text('port = 9100\n[[model]]\nhf_repo = "pie/tiny-random"\n')
    config = load_config()
    assert (config.source, config.port, config.pie_home) == (tmp_path / "config.toml", 9100, tmp_path)
    assert config.adapter_path == tmp_path / "adapters"


def test_show_output_loads_back_to_the_same_config() -> None:
    for text in (SEED_000_EXAMPLE, SEED_002_CUDA_NATIVE, "", '[runtime]\nisolation = "isolated"\n'
                 'inferlet_paths = ["/srv/inferlets"]\n[sandbox]\ncpu_time_s = 10\n'):
        config = parse(text)
        again = parse_config(tomllib.loads(config.to_toml()), source=config.source, home=config.pie_home)
        assert dataclasses.replace(again, notes=()) == dataclasses.replace(config, notes=())


def test_command_line_overrides_are_checked() -> None:
    config = parse("port = 9000").with_overrides(host="0.0.0.0", port=None, enable_auth=False)
    assert (config.host, config.port, config.enable_auth) == ("0.0.0.0", 9000, False)
    with pytest.raises(ConfigError, match="command line: port = 70000 is above the maximum 65535"):
        config.with_overrides(port=70000)


def test_set_key_edits_one_key_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('port = 9000\n[[model]]\nhf_repo = "pie/tiny-random"\ndevice = ["cpu"]\n')
    config = set_key(path, "model.0.hf_repo", "Qwen/Qwen3-0.6B")
    assert config.models[0].hf_repo == "Qwen/Qwen3-0.6B" and config.port == 9000
    set_key(path, "telemetry.enabled", "true")
    set_key(path, "model.0.driver.options.kv_page_size", "32")
    set_key(path, "model.1.hf_repo", "pie/tiny-random")  # one past the end adds a model
    set_key(path, "model.1.device", "cuda:1")  # one value where a list goes
    raw = tomllib.loads(path.read_text())
    assert raw["port"] == 9000 and raw["telemetry"] == {"enabled": True}
    assert raw["model"] == [
        {"hf_repo": "Qwen/Qwen3-0.6B", "device": ["cpu"], "driver": {"options": {"kv_page_size": 32}}},
        {"hf_repo": "pie/tiny-random", "device": "cuda:1"},
    ]
    assert load_config(path).models[1].device == ("cuda:1",)


@pytest.mark.parametrize(("text", "key", "value", "expected"), [
    ('[model]\nhf_repo = "a/b"\n', "model.0.kv_page_size", "0", "model.kv_page_size = 0 is below the minimum 1"),
    ('[model]\nhf_repo = "a/b"\n', "model.0.kv_page_sise", "16", "did you mean 'kv_page_size'?"),
    ('[model]\nhf_repo = "a/b"\n', "model.3.hf_repo", "x/y", "model has 1 entries (0..0)"),
    ("port = 1\n", "port.x", "1", "port is a value, not a table"),
    ("port = 1\n", "model.0", "1", "is not a key path"),
    ("port = 1\n", "telemetry.0.x", "1", "telemetry is a list, not a table"),
    ("port = 1\n", "0.x", "1", "0 indexes something that is not a list of tables"),
])
def test_set_key_refuses_what_would_not_load_and_leaves_the_file(tmp_path: Path, text: str, key: str, value: str,
                                                                 expected: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        set_key(path, key, value)
    assert expected in str(caught.value)
    assert path.read_text() == text


def test_set_key_creates_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "new" / "config.toml"
    assert set_key(path, "port", "9").port == 9
    assert tomllib.loads(path.read_text()) == {"port": 9}


def test_parse_scalar() -> None:
    assert [parse_scalar(v) for v in ("64", "0.5", "true", "False", "cuda:0", "nan", '["a", "b"]', '"12"')] == \
        [64, 0.5, True, False, "cuda:0", "nan", ["a", "b"], "12"]


def test_the_default_file_loads() -> None:
    config = parse(default_config_text("cpu", "pie/tiny-random"))
    assert config.models[0].device == ("cpu",) and config.models[0].hf_repo == "pie/tiny-random"


def test_the_reference_documents_every_key() -> None:
    from pie.runtime.sandbox.policy import SandboxPolicy

    doc = (REPO / "docs" / "configuration.md").read_text()
    for cls in (Config, ModelConfig, ModelOptions, TelemetryConfig, ServerConfig, RuntimeConfig, SandboxPolicy,
                McpConfig, McpServerConfig):
        for f in dataclasses.fields(cls):
            if f.name not in ("models", "defaults", "telemetry", "server", "runtime", "pie_home", "source",
                              "notes", "sandbox", "options", "driver", "mcp", "mcp_servers"):
                assert f"`{f.name}`" in doc, f"{cls.__name__}.{f.name} is not in docs/configuration.md"
    assert "`driver.type`" in doc  # ModelConfig.driver: [model.driver] type
