"""`pie auth add | remove | list`: the users and public keys in $PIE_HOME/authorized_users.toml."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from pie.auth import add_key, keystore_path, read_users, remove
from pie.cli.common import command_group, confirm, fail

app = command_group("Manage who may connect when enable_auth is on (SSH public keys).")

UserArg = Annotated[str, typer.Argument(help="User name (what clients identify as).")]


@app.command()
def add(
    user: UserArg,
    key_name: Annotated[str | None, typer.Argument(help="Name for this key [default: a UTC timestamp].")] = None,
) -> None:
    """Authorize a public key read from stdin (OpenSSH or PEM; Ed25519, ECDSA P-256/P-384, RSA >= 2048)."""
    if sys.stdin.isatty():
        typer.echo("paste the public key, then Ctrl-D (or: pie auth add USER < ~/.ssh/id_ed25519.pub)", err=True)
    path = keystore_path()
    added = add_key(path, user, sys.stdin.read(), key_name)
    typer.echo(f"added key {added.name!r} ({added.type}, {added.fingerprint}) for user {user!r} in {path}")


@app.command("remove")
def remove_(
    user: UserArg,
    key_name: Annotated[str | None, typer.Argument(help="The key to remove [default: the whole user].")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before removing a whole user.")] = False,
) -> None:
    """Remove one key of a user, or (without KEY_NAME, after confirming) the user and all its keys."""
    path = keystore_path()
    if key_name is None and not yes:
        count = len(read_users(path).get(user, {}))
        if count and not confirm(f"remove user {user!r} and its {count} key(s)?"):
            fail(f"kept user {user!r}")
    removed = remove(path, user, key_name)
    what = f"key {key_name!r} of user {user!r}" if key_name else f"user {user!r} ({len(removed)} key(s))"
    typer.echo(f"removed {what} from {path}")


@app.command("list")
def list_() -> None:
    """List users and their keys (type and SHA256 fingerprint)."""
    path = keystore_path()
    users = read_users(path)
    if not users:
        typer.echo(f"no users in {path}; add one with `pie auth add USER < ~/.ssh/id_ed25519.pub`")
        return
    typer.echo(f"# {path}")
    for user, keys in sorted(users.items()):
        typer.echo(user)
        for key in keys.values():
            typer.echo(f"  {key.name}  {key.type}  {key.fingerprint}")
