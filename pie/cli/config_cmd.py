"""`pie config init | show | set | validate`."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated

import typer

from pie.cli.common import ConfigOption, command_group, confirm, fail, print_notes
from pie.config import default_config_path, load_config
from pie.config_io import atomic_write, default_config_text, set_key
from pie.errors import FlavorError
from pie.flavors import installed_flavor
from pie.tiny_model import TINY_MODEL_ID

app = command_group("Write, show, edit and check the configuration.")


def _path(config: Path | None) -> Path:
    return config.expanduser() if config is not None else default_config_path()


@app.command()
def init(
    config: ConfigOption = None,
    device: Annotated[str | None, typer.Option(help="Device to name [default: cuda:0 if CUDA works, else mps, "
                                               "else cpu].")] = None,
    model: Annotated[str, typer.Option(help="Hugging Face repo id (Qwen/Qwen3-0.6B), local folder, or the built-in "
                                       "offline model, as install.sh writes.")] = TINY_MODEL_ID,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file without asking.")] = False,
) -> None:
    """Write a starter config (never over an existing one without asking): the built-in offline model,
    as install.sh and the Nix module write; `--model Qwen/Qwen3-0.6B` for real text."""
    path = _path(config)
    if path.exists() and not force and not confirm(f"{path} exists; overwrite it?"):
        fail(f"kept {path} as it is (pass --force to overwrite it)")
    device = device or _default_device()
    text = default_config_text(device, model, cuda_graphs=_cuda_graphs_by_default(device))
    atomic_write(path, text)
    load_config(path)  # what init writes always loads
    typer.echo(f"wrote {path}")


def _cuda_graphs_by_default(device: str) -> bool:
    """A CUDA device on a flavor with FlashInfer (the installed flavor, else FlashInfer importable) runs decode
    steps as CUDA graphs, as install.sh's config does on a CUDA flavor; they need the flashinfer backend."""
    if not device.startswith("cuda"):
        return False
    try:
        flavor = installed_flavor()
    except FlavorError:  # a broken flavor record is `pie doctor`'s to report; decide from what is importable
        flavor = None
    if flavor is not None:
        return flavor.has_flashinfer
    return importlib.util.find_spec("flashinfer") is not None


def _default_device() -> str:
    from pie.engine.device import resolve_device  # imports torch: only when no --device was given

    return str(resolve_device("auto"))


@app.command()
def show(config: ConfigOption = None) -> None:
    """Print the effective config: every key, defaults included, as TOML that loads back the same."""
    settings = load_config(config)
    typer.echo(f"# effective configuration from {settings.source or 'the built-in defaults (no config file)'}")
    typer.echo(settings.to_toml(), nl=False)
    print_notes(settings.notes)


@app.command("set", context_settings={"ignore_unknown_options": True})  # VALUE may be -1
def set_(
    key: Annotated[str, typer.Argument(metavar="KEY", help="Dotted key, e.g. port, telemetry.enabled, model.0.hf_repo "
                                       "(model.N one past the last adds a model).")],
    value: Annotated[str, typer.Argument(metavar="VALUE", help="Int, float, true/false or text; [..] for a list.")],
    config: ConfigOption = None,
) -> None:
    """Set one key in the config file, keeping the others; refuses a value that would not load."""
    path = _path(config)
    settings = set_key(path, key, value)
    typer.echo(f"set {key} in {path}")
    print_notes(settings.notes)


@app.command()
def validate(config: ConfigOption = None) -> None:
    """Check the config: exit 0 when it loads, 1 with the offending key and the fix when not."""
    settings = load_config(config)
    source = settings.source or "no config file (built-in defaults)"
    names = ", ".join(m.name for m in settings.models)
    typer.echo(f"ok: {source}: {len(settings.models)} model(s) ({names}), {settings.host}:{settings.port}, "
               f"auth {'on' if settings.enable_auth else 'off'}")
    print_notes(settings.notes)
