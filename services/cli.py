"""`sluice`: the one command line of Sluiceway. Each command group lives with its owner."""

from __future__ import annotations

import typer

from deploy.local.cli import app as dev_app
from services.features.cli import app as features_app
from services.inference.cli import app as models_app
from services.ingest.cli import app as gateway_app
from services.rollout.cli import app as rollout_app

app = typer.Typer(help="Sluiceway: event-driven ML serving on Kafka.", no_args_is_help=True)
app.add_typer(dev_app, name="dev", help="The local dev cluster: broker, Redis, ClickHouse.")
app.add_typer(features_app, name="features", help="Feature definitions: export, skew check.")
app.add_typer(models_app, name="models", help="The model repository: register, import, list.")
app.add_typer(gateway_app, name="gateway", help="The HTTP gateway: API keys.")
app.add_typer(
    rollout_app,
    name="rollout",
    help="Progressive delivery: start, status, pause, resume, promote, abort, history.",
)


@app.command()
def demo(
    minutes: float = typer.Option(0, help="Stop after this many minutes (0 = until Ctrl-C)."),
    rate: float = typer.Option(150.0, help="Transactions per second of demo traffic."),
    drift_after: float = typer.Option(180.0, help="Seconds before amounts start to drift."),
    view: bool = typer.Option(True, help="Show the live terminal view."),
    bucket_s: float = typer.Option(
        300.0, help="Seconds per row of the latency table printed at the end."
    ),
) -> None:
    """The whole system on the local cluster with live demo traffic (what `make run` runs)."""
    from deploy.demo.run import run

    run(
        minutes=minutes or None,
        rate=rate,
        drift_after_s=drift_after,
        view=view,
        bucket_s=bucket_s,
    )


if __name__ == "__main__":
    app()
