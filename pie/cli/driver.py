"""`pie driver list` and `pie driver dev install | set | show | doctor` (seed 002)."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path
from typing import Annotated

import typer

from pie.cli.common import ConfigOption, command_group, fail, status
from pie.cli.driver_env import PROBE, Interpreter, install_plan, read_choice, resolve_python, store_choice
from pie.config import load_config, pie_home

app = command_group("The drivers that run models, and the dev driver's Python environment.")
dev = command_group("The dev driver: pie's Python engine (PyTorch, FlashInfer on CUDA).")
dev_set = command_group("Choose the dev driver's interpreter.")
app.add_typer(dev, name="dev")
dev.add_typer(dev_set, name="set")


@app.command("list")
def list_() -> None:
    """The drivers this pie has."""
    interpreter = resolve_python()
    typer.echo(f"dev          pie's Python engine; interpreter {interpreter.python} (from {interpreter.source})")
    typer.echo("cuda_native  not in this pie (it has one engine); configs naming it run on dev")


@dev.command()
def install(
    path: Annotated[Path | None, typer.Argument(help="Where to create the venv [default: $PIE_HOME/venvs/dev].")] = None,
    run: Annotated[bool, typer.Option("--run", help="Run the commands (without it they are only printed).")] = False,
) -> None:
    """Create a venv with torch (the build of this install's flavor) and pie's engine."""
    venv = (path or pie_home() / "venvs" / "dev").expanduser().resolve()
    commands, note = install_plan(venv)
    typer.echo(f"# {note}")
    for command in commands:
        typer.echo(shlex.join(command))
        if run and subprocess.run(command, check=False).returncode != 0:
            fail(f"`{shlex.join(command)}` failed (its output is above)")
    if run:
        typer.echo(f"next: pie driver dev set venv {shlex.quote(str(venv))} && pie driver dev doctor")
    else:
        typer.echo("# these were not run; add --run to run them")


@dev_set.command("venv")
def set_venv(path: Annotated[Path, typer.Argument(help="A virtualenv folder (with bin/python).")]) -> None:
    """Use this virtualenv's interpreter for the dev driver."""
    typer.echo(f"dev driver: {store_choice('venv', path)}")


@dev_set.command("python")
def set_python(path: Annotated[Path, typer.Argument(help="A python executable.")]) -> None:
    """Use this python executable for the dev driver."""
    typer.echo(f"dev driver: {store_choice('python', path)}")


@dev.command()
def show(config: ConfigOption = None) -> None:
    """The stored choice and the interpreter each configured model would use."""
    choice = read_choice()
    typer.echo(f"stored: {choice[0]} = {choice[1]}" if choice else "stored: nothing (`pie driver dev set venv PATH`)")
    for model in load_config(config).models:
        interpreter = resolve_python(model.options)
        typer.echo(f"{model.name}: {interpreter.python} (from {interpreter.source})")


@dev.command("doctor")
def doctor_(config: ConfigOption = None) -> None:
    """Check that the dev driver's interpreter runs pie's engine: torch, CUDA, FlashInfer."""
    settings = load_config(config)
    interpreter = resolve_python(settings.models[0].options)
    facts = probe(interpreter)
    ok = "torch" in facts and "pie" in facts
    status("ok", f"python {facts['python']} at {facts['executable']} (from {interpreter.source})")
    if "torch" in facts:
        cuda = f"CUDA {facts['torch_cuda']}, {facts['cuda_devices']} device(s)" if facts["cuda"] else "no CUDA device"
        status("ok", f"torch {facts['torch']} ({cuda})")
    else:
        status("fail", f"torch does not import ({facts['torch_error']}); run `pie driver dev install --run`")
    if facts["flashinfer"]:
        status("ok", "flashinfer importable")
    elif facts.get("cuda"):
        status("warn", "flashinfer missing: CUDA attention falls back to the slower torch_ref kernels")
    else:
        status("ok", "flashinfer not installed (not used without CUDA)")
    if "pie" in facts:
        status("ok", "pie's engine imports")
    else:
        status("fail", f"pie's engine does not import ({facts['pie_error']}); install pie into this interpreter")
    if not ok:
        raise typer.Exit(1)


def probe(interpreter: Interpreter) -> dict[str, object]:
    """Run the interpreter on PROBE; what it reports about itself."""
    try:
        done = subprocess.run([str(interpreter.python), "-c", PROBE], capture_output=True, text=True,
                              timeout=300, check=False)
    except OSError as error:
        fail(f"cannot run {interpreter.python} (from {interpreter.source}): {error.strerror}")
    except subprocess.TimeoutExpired:
        fail(f"{interpreter.python} did not answer within 300 s (importing torch and pie's engine)")
    if done.returncode != 0:
        fail(f"{interpreter.python} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result
