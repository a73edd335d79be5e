"""Writing configuration: the effective config as TOML, a default file, and `pie config set KEY VALUE`.

`config_to_toml` writes every effective value (defaults included) in the `[model.driver]` style; reading
it back gives the same `Config`. `set_key` edits one key of the file and keeps the others (comments
are not kept: the file is rewritten from its parsed form), refusing any edit that would not load.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from pie.config import DEFAULT_MODEL, Config, ModelConfig, ModelOptions, parse_config
from pie.config_schema import field_names
from pie.errors import ConfigError

HEADER = ("# pie configuration. Every key is described in pie's docs/configuration.md;\n"
          "# `pie config show` prints the effective configuration, defaults included.\n")


def config_to_toml(config: Config) -> str:
    return tomli_w.dumps(config_to_dict(config))


def config_to_dict(config: Config) -> dict[str, Any]:
    top: dict[str, Any] = {"host": config.host, "port": config.port, "enable_auth": config.enable_auth}
    top_options = field_names(ModelOptions, include_model_only=False)
    top |= {k: v for k, v in dataclasses.asdict(config.defaults).items() if k in top_options}
    runtime = config.runtime
    tables: dict[str, Any] = {
        "telemetry": dataclasses.asdict(config.telemetry),
        "server": dataclasses.asdict(config.server),
        "runtime": {f.name: getattr(runtime, f.name) for f in dataclasses.fields(runtime) if f.name != "sandbox"}
        | {"inferlet_paths": [str(p) for p in runtime.inferlet_paths]},
    }
    if runtime.sandbox is not None:
        tables["sandbox"] = runtime.sandbox.to_dict()
    tables["mcp"] = {"call_timeout_s": config.mcp.call_timeout_s, "allowed_urls": list(config.mcp.allowed_urls)}
    if config.mcp_servers:
        tables["mcp_server"] = [{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(s).items()}
                                for s in config.mcp_servers]
    return top | tables | {"model": [_model_dict(m) for m in config.models]}


def _model_dict(model: ModelConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"name": model.name, "hf_repo": model.hf_repo}
    if model.revision:
        out["revision"] = model.revision
    out["driver"] = {"type": model.driver, "device": list(model.device),
                     "tensor_parallel_size": model.tensor_parallel_size,
                     "activation_dtype": model.activation_dtype,
                     "options": dataclasses.asdict(model.options)}
    return out


def default_config_text(device: str, model: str = DEFAULT_MODEL, *, cuda_graphs: bool = False) -> str:
    """What `pie config init` writes: the keys an operator edits first; the rest keep their defaults.
    cuda_graphs: the model runs decode steps as CUDA graphs (a CUDA flavor's config; the key's default is off)."""
    entry: dict[str, Any] = {"hf_repo": model, "device": [device]}
    if cuda_graphs:
        entry["use_cuda_graphs"] = True
    body = {"host": Config.host, "port": Config.port, "enable_auth": Config.enable_auth, "model": [entry]}
    return HEADER + tomli_w.dumps(body)


def parse_value(text: str) -> Any:
    """A command-line value: int, then float, then bool (true/false, any case), then the text itself."""
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        if kind is int or math.isfinite(value):  # "nan" and "inf" stay text
            return value
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_scalar(text: str) -> Any:
    """`parse_value`, except that text starting with `[`, `{` or a quote is read as a TOML value
    (a list, a table, a quoted string)."""
    if text[:1] in ("[", "{", '"', "'"):
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            return text
    return parse_value(text)


def set_key(path: Path | str, dotted_key: str, value: Any, *, home: Path | None = None) -> Config:
    """Set `dotted_key` (e.g. `model.0.hf_repo`, `telemetry.enabled`) to `value` in the file at `path`
    (created if missing); a str value is parsed with `parse_scalar`. Returns the config as reloaded."""
    path = Path(path).expanduser()
    data = _read_raw(path)
    parts = dotted_key.split(".")
    if not all(parts) or parts[-1].isdigit():
        raise ConfigError(f"{dotted_key!r} is not a key path; write it as dotted names, e.g. model.0.hf_repo")
    parent = _walk(data, parts[:-1], dotted_key, path)
    parent[parts[-1]] = parse_scalar(value) if isinstance(value, str) else value
    config = parse_config(data, source=path, home=home)  # refuses an invalid result before writing
    atomic_write(path, tomli_w.dumps(data))
    return config


def _read_raw(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error}); fix it by hand first") from None


def _walk(node: dict[str, Any], parts: list[str], dotted_key: str, path: Path) -> dict[str, Any]:
    """The table that will hold the key's last part, creating tables (and one new [[model]]) on the way."""
    i = 0
    while i < len(parts):
        part, here = parts[i], ".".join(parts[: i + 1])
        if part.isdigit():
            raise ConfigError(f"{path}: {dotted_key}: {here} indexes something that is not a list of tables; "
                              "only `model` is one (model.0, model.1, ...)")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            node = _index(node, part, int(parts[i + 1]), path, dotted_key)
            i += 2
            continue
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{path}: {dotted_key}: {here} is a value, not a table; set {here} itself")
        node, i = child, i + 1
    return node


def _index(node: dict[str, Any], name: str, index: int, path: Path, dotted_key: str) -> dict[str, Any]:
    items = node.get(name)
    if isinstance(items, dict):  # `[model]` written as one table: entry 0 (a list once another is added)
        if index == 0:
            return items
        items = node[name] = [items]
    items = node.setdefault(name, [])
    if not isinstance(items, list):
        raise ConfigError(f"{path}: {dotted_key}: {name} is not a list of tables")
    if index == len(items):  # one past the end adds an entry
        items.append({})
    if index >= len(items):
        raise ConfigError(f"{path}: {dotted_key}: {name} has {len(items)} entries (0..{len(items) - 1}); "
                          f"use an index up to {len(items)} (that one adds an entry)")
    entry = items[index]
    if not isinstance(entry, dict):
        raise ConfigError(f"{path}: {dotted_key}: {name} is a list of values, not of tables; "
                          f"set the whole list, e.g. {name} = '[...]'")
    return entry


def atomic_write(path: Path, text: str, *, mode: int | None = None) -> None:
    """Replace `path` with `text` in one rename (readers never see half a file); `mode` before the rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        if mode is not None:
            os.chmod(tmp, mode)
        elif path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        else:
            os.chmod(tmp, 0o644)  # mkstemp's 0600 is for secrets; a config is readable like any dotfile
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

