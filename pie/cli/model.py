"""`pie model list | download | add | remove | info`: checkpoints in the Hugging Face cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pie.cli.catalog import (
    DeviceMemory,
    ModelFacts,
    builtin_model,
    cached_repos,
    delete_repo,
    device_memory,
    gib,
    human_count,
    inspect_checkpoint,
)
from pie.cli.common import command_group, confirm, fail
from pie.errors import ModelNotFoundError
from pie.tiny_model import TINY_MODEL_ID

app = command_group("List, download, inspect and remove models (the Hugging Face cache).")

CacheDir = Annotated[Path | None, typer.Option(help="Hugging Face cache folder [default: huggingface_hub's, "
                                               "from HF_HUB_CACHE / HF_HOME].", file_okay=False)]
RepoArg = Annotated[str, typer.Argument(help="Hugging Face repo id, e.g. Qwen/Qwen3-0.6B.")]


@app.command("list")
def list_(cache_dir: CacheDir = None) -> None:
    """List cached models: ✓ runnable here (with the architecture), ○ not (with why)."""
    memory = device_memory()
    typer.echo(f"# device {memory.device} with {gib(memory.total_bytes)}; ✓ runnable, ○ not")
    rows = [builtin_model(memory)]
    rows += [inspect_checkpoint(r.repo_id, r.snapshot, memory) for r in cached_repos(cache_dir)]
    width = max(len(f.name) for f in rows)
    for facts in rows:
        typer.echo(_row(facts, width))


def _row(facts: ModelFacts, width: int) -> str:
    if facts.problem is not None:
        return f"○ {facts.name:<{width}}  {facts.problem.split(';')[0]}"
    if facts.path is None:
        return f"✓ {facts.name:<{width}}  {facts.model_type} ({facts.architecture}), built in, generated on first use"
    size = f"{human_count(facts.num_params)} params, {facts.checkpoint_dtype}, ~{gib(facts.estimated_bytes)}"
    if facts.state_bytes_per_sequence:
        size += f" + {gib(facts.state_bytes_per_sequence)} recurrent state per sequence"
    return f"✓ {facts.name:<{width}}  {facts.model_type} ({facts.architecture}), {size}, {_modalities(facts)}"


def _modalities(facts: ModelFacts) -> str:
    """"text+image", or "text (image, audio not run)" for towers pie skips."""
    served = "+".join(facts.modalities)
    return f"{served} ({', '.join(facts.unserved)} not run)" if facts.unserved else served


@app.command()
def download(
    repo_id: RepoArg,
    revision: Annotated[str | None, typer.Option(help="Branch, tag or commit [default: main].")] = None,
) -> None:
    """Download a model into the Hugging Face cache, then print its path and whether it runs here."""
    from pie.model_source import resolve_model_dir

    typer.echo(f"fetching {repo_id} (config, tokenizer, *.safetensors)...", err=True)
    path = resolve_model_dir(repo_id, revision=revision, download=True, suggest_download=False)
    typer.echo(f"{repo_id}: {path}")
    _print_info(inspect_checkpoint(repo_id, path, device_memory()), device_memory())


app.command("add", help="Alias of `download`.")(download)


@app.command("remove")
def remove_(
    repo_id: RepoArg,
    cache_dir: CacheDir = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask first.")] = False,
) -> None:
    """Delete a model (every cached revision) from the Hugging Face cache, after confirming."""
    repo = next((r for r in cached_repos(cache_dir) if r.repo_id == repo_id), None)
    if repo is None:
        raise ModelNotFoundError(f"{repo_id} is not in the Hugging Face cache; `pie model list` shows what is")
    if not yes and not confirm(f"delete {repo_id} ({gib(repo.size_on_disk)}, {len(repo.revisions)} revision(s))?"):
        fail(f"kept {repo_id}")
    freed = delete_repo(repo_id, cache_dir)
    typer.echo(f"removed {repo_id} ({gib(freed)} freed)")


@app.command()
def info(
    name: Annotated[str, typer.Argument(help="A cached repo id, a checkpoint folder, or pie/tiny-random.")],
    cache_dir: CacheDir = None,
) -> None:
    """Architecture, parameter count, dtype, estimated memory, and whether (or why not) it runs here."""
    memory = device_memory()
    if name == TINY_MODEL_ID:
        facts = builtin_model(memory, generate=True)
    elif Path(name).expanduser().is_dir():
        facts = inspect_checkpoint(name, Path(name).expanduser().resolve(), memory)
    else:
        repo = next((r for r in cached_repos(cache_dir) if r.repo_id == name), None)
        if repo is None:
            raise ModelNotFoundError(f"{name} is neither a checkpoint folder nor in the Hugging Face cache; "
                                     f"fetch it with `pie model download {name}`")
        facts = inspect_checkpoint(name, repo.snapshot, memory)
    _print_info(facts, memory)


def _print_info(facts: ModelFacts, memory: DeviceMemory) -> None:
    lines = {
        "name": facts.name,
        "path": str(facts.path),
        "architecture": f"{facts.architecture or '?'} (model_type {facts.model_type or '?'})",
        "parameters": f"{facts.num_params:,} ({human_count(facts.num_params)})",
        "dtype": f"{facts.checkpoint_dtype or '?'} (as stored)",
        "memory": f"~{gib(facts.estimated_bytes)} on {memory.device} (which has {gib(memory.total_bytes)})",
        "supported": "yes" if facts.problem is None else f"no: {facts.problem}",
        "inputs": _modalities(facts),
    }
    if facts.state_bytes_per_sequence:  # a hybrid: each live sequence also holds a state slot
        lines["state"] = (f"{gib(facts.state_bytes_per_sequence)} per sequence ({facts.state_bytes_per_sequence:,} "
                          "bytes of recurrent state, whatever its length; on top of its KV pages)")
    for key, value in lines.items():
        typer.echo(f"{key + ':':<14}{value}")
