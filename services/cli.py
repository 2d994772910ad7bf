"""`sluice`: the one command line of Sluiceway. Each command group lives with its owner."""

from __future__ import annotations

import typer

from deploy.local.cli import app as dev_app
from services.inference.cli import app as models_app
from services.ingest.cli import app as gateway_app

app = typer.Typer(help="Sluiceway: event-driven ML serving on Kafka.", no_args_is_help=True)
app.add_typer(dev_app, name="dev", help="The local dev cluster: broker, Redis, ClickHouse.")
app.add_typer(models_app, name="models", help="The model repository: register, import, list.")
app.add_typer(gateway_app, name="gateway", help="The HTTP gateway: API keys.")


if __name__ == "__main__":
    app()
