"""`sluice gateway`: helpers for operating the HTTP gateway."""

from __future__ import annotations

from typing import Annotated

import typer

from services.common.apikeys import ROLES, hash_key

app = typer.Typer(no_args_is_help=True)


@app.command("hash-key")
def hash_key_command(
    name: Annotated[str, typer.Argument(help="Who the key is for, e.g. fraud-service.")],
    roles: Annotated[str, typer.Option(help="Roles joined by '+': predict, ingest, admin.")] = (
        "predict"
    ),
    key: Annotated[
        str, typer.Option(prompt=True, hide_input=True, help="The secret key (prompted).")
    ] = "",
) -> None:
    """Print the `SLUICE_INGEST_API_KEYS` entry for a key: the key itself is not stored."""
    unknown = set(roles.split("+")) - set(ROLES)
    if unknown:
        typer.echo(f"unknown roles {sorted(unknown)}; choose from {', '.join(ROLES)}", err=True)
        raise typer.Exit(2)
    typer.echo(f"{name}:{hash_key(key)}:{roles}")
