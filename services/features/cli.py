"""`sluice features ...`: inspect definitions, read the online store, build training sets, check
training/serving skew. Connections come from the `SLUICE_*` settings."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.console import Console
from rich.table import Table

from services.features.api import entity_features
from services.features.app import connect_redis
from services.features.definitions import (
    DefinitionError,
    FeatureRegistry,
    format_duration,
    parse_duration,
)
from services.features.offline import (
    EventLog,
    OfflineError,
    build_training_set,
    connect_clickhouse,
    read_spine_csv,
    spine_from_predictions,
    write_training_set,
)
from services.features.settings import FeaturesSettings
from services.features.skew import SkewReport, check_skew, load_served
from services.features.store import migrate_snapshots

app = typer.Typer(help="Online/offline features: definitions, training sets, skew.")
console = Console()

DefinitionsOption = Annotated[
    Path | None,
    typer.Option("--definitions", "-d", help="Definitions file (default: settings)."),
]


def _registry(path: Path | None) -> FeatureRegistry:
    try:
        return FeatureRegistry.load(path or FeaturesSettings().features_definitions)
    except DefinitionError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


@app.command()
def show(definitions: DefinitionsOption = None) -> None:
    """List the features and views of a definitions file."""
    registry = _registry(definitions)
    table = Table(title=f"features ({registry.fingerprint()})")
    for column in ("name", "entity", "aggregation", "field", "window", "lateness", "default"):
        table.add_column(column)
    for feature in registry.features:
        table.add_row(
            feature.name,
            feature.entity,
            feature.aggregation.value,
            feature.field or "",
            format_duration(feature.window),
            format_duration(feature.allowed_lateness),
            repr(feature.default),
        )
    console.print(table)
    for name, view in registry.views.items():
        console.print(f"view [bold]{name}[/bold]: {', '.join(view.features)}")


@app.command()
def get(
    entity: str,
    entity_id: str,
    names: Annotated[str | None, typer.Option(help="Comma-separated features.")] = None,
    definitions: DefinitionsOption = None,
) -> None:
    """Print one entity's online features as inference would be served them now (JSON)."""
    registry = _registry(definitions)
    redis = connect_redis(FeaturesSettings())
    result = entity_features(registry, redis, entity, entity_id, names, int(time.time() * 1000))
    typer.echo(orjson.dumps(result.model_dump(), option=orjson.OPT_INDENT_2).decode())


@app.command("migrate-snapshots")
def migrate_snapshots_command() -> None:
    """Write the read snapshot of every entity hash that lacks one (an online store written by
    a build before `sluice:fvs:*` existed). Safe while the service runs; idempotent."""
    written = migrate_snapshots(connect_redis(FeaturesSettings()))
    console.print(f"{written} snapshots written")


@app.command()
def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file: `.csv` or `.parquet`.")],
    view: Annotated[str | None, typer.Option(help="Export the features of this view.")] = None,
    features: Annotated[
        str | None, typer.Option(help="Comma-separated features (instead of --view).")
    ] = None,
    spine: Annotated[
        Path | None,
        typer.Option(help="CSV with `ts_ms` and one id column per entity (`card`, ...)."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Instead of --spine: every prediction of this model, with its label."),
    ] = None,
    entity: Annotated[
        str, typer.Option(help="With --model: the entity that predictions' entity_id names.")
    ] = "card",
    definitions: DefinitionsOption = None,
) -> None:
    """Build a point-in-time training set from the ClickHouse events log.

    Each row gets the features as of its own time: only events at or before it count, and
    missing values get their declared defaults, exactly as the online store serves them.
    """
    registry = _registry(definitions)
    names = _feature_names(registry, view, features)
    if (spine is None) == (model is None):
        raise typer.BadParameter("give exactly one of --spine and --model")
    if out.suffix.lower() not in (".csv", ".parquet"):
        raise typer.BadParameter("--out must end in .csv or .parquet")
    settings = FeaturesSettings()
    client = connect_clickhouse(settings)
    try:
        if spine is not None:
            columns, rows = read_spine_csv(spine)
        else:
            columns, rows = spine_from_predictions(
                client, settings.clickhouse_database, model or "", entity
            )
        log = EventLog(client, settings.clickhouse_database)
        values = build_training_set(registry, log, rows, names)
        written = write_training_set(out, columns, rows, names, values)
    except OfflineError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    finally:
        client.disconnect()
    console.print(f"{written} rows x {len(names)} features written to {out}")


@app.command()
def skew(
    model: Annotated[str, typer.Option(help="Model whose served feature vectors are checked.")],
    entity: Annotated[
        str, typer.Option(help="The entity that predictions' entity_id names.")
    ] = "card",
    since_ms: Annotated[int, typer.Option(help="Only predictions from this time on.")] = 0,
    until_ms: Annotated[int | None, typer.Option(help="Only predictions up to this time.")] = None,
    max_lag: Annotated[
        str, typer.Option(help="Online lag tolerated as `stale` (e.g. 30s, 5m).")
    ] = "5m",
    limit: Annotated[int, typer.Option(help="Most predictions checked.")] = 100_000,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    definitions: DefinitionsOption = None,
) -> None:
    """Recompute served feature vectors offline; exit 1 when any feature mismatches."""
    registry = _registry(definitions)
    settings = FeaturesSettings()
    client = connect_clickhouse(settings)
    try:
        served = load_served(client, settings.clickhouse_database, model, since_ms, until_ms, limit)
        log = EventLog(client, settings.clickhouse_database)
        report = check_skew(registry, log, served, entity, max_lag_ms=parse_duration(max_lag))
    except OfflineError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    finally:
        client.disconnect()
    if as_json:
        body = {**asdict(report), "mismatched": report.mismatched}
        typer.echo(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
    else:
        _print_skew(report)
    if report.mismatched:
        raise typer.Exit(1)


def _feature_names(registry: FeatureRegistry, view: str | None, features: str | None) -> list[str]:
    if (view is None) == (features is None):
        raise typer.BadParameter("give exactly one of --view and --features")
    if view is not None:
        if view not in registry.views:
            raise typer.BadParameter(f"unknown view {view!r}; known: {sorted(registry.views)}")
        return list(registry.view(view).features)
    names = [name.strip() for name in (features or "").split(",") if name.strip()]
    unknown = [name for name in names if not registry.has_feature(name)]
    if unknown:
        raise typer.BadParameter(f"unknown features {unknown}")
    return names


def _print_skew(report: SkewReport) -> None:
    table = Table(title=f"skew over {report.predictions} predictions")
    for column in ("feature", "checked", "match", "stale (lag/late)", "mismatch"):
        table.add_column(column)
    for outcome in report.features.values():
        table.add_row(
            outcome.feature,
            str(outcome.checked),
            str(outcome.matched),
            str(outcome.stale),
            f"[red]{outcome.mismatched}[/red]" if outcome.mismatched else "0",
        )
    console.print(table)
    for outcome in report.features.values():
        for example in outcome.examples:
            console.print(
                f"  {outcome.feature}: request {example.request_id} ({example.entity_id} at "
                f"{example.at_ms}) served {example.served!r}, expected {example.expected!r}"
            )
    for name, reason in report.skipped.items():
        console.print(f"  skipped {name}: {reason}")
