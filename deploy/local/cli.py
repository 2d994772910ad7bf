"""`sluice dev`: start, stop and inspect the local dev cluster (see `deploy.local.cluster`).

Every option can also come from an environment variable `SLUICE_DEV_<OPTION>`, e.g.
`SLUICE_DEV_STATE_DIR` or `SLUICE_DEV_KAFKA_PORT`. `status` and `env` must be given the same
ports and `--brokers` as `up` was, since they probe and print those ports; `down` stops every
broker its state directory started.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from deploy.local import cluster
from deploy.local.cluster import ClusterConfig, ClusterError, PartStatus

app = typer.Typer(
    help="Run the local dev cluster: Apache Kafka (KRaft), Redis and ClickHouse.",
    no_args_is_help=True,
)

_DEFAULTS = ClusterConfig()

StateDir = Annotated[
    Path,
    typer.Option(envvar="SLUICE_DEV_STATE_DIR", help="Directory for PID files, data and logs."),
]
KafkaPort = Annotated[
    int, typer.Option(envvar="SLUICE_DEV_KAFKA_PORT", help="Client (PLAINTEXT) port of the broker.")
]
KafkaControllerPort = Annotated[
    int | None,
    typer.Option(
        envvar="SLUICE_DEV_KAFKA_CONTROLLER_PORT",
        help="KRaft controller port of the broker [default: the client port + 1].",
    ),
]
Brokers = Annotated[
    int,
    typer.Option(
        envvar="SLUICE_DEV_BROKERS",
        help="KRaft nodes (broker + controller each); 3 gives replication factor 3, "
        "min.insync.replicas 2. Brokers 2..N take the two ports after the previous one's.",
    ),
]
RedisPort = Annotated[int, typer.Option(envvar="SLUICE_DEV_REDIS_PORT", help="Redis port.")]
ClickhouseTcpPort = Annotated[
    int,
    typer.Option(envvar="SLUICE_DEV_CLICKHOUSE_TCP_PORT", help="ClickHouse native-protocol port."),
]
ClickhouseHttpPort = Annotated[
    int, typer.Option(envvar="SLUICE_DEV_CLICKHOUSE_HTTP_PORT", help="ClickHouse HTTP port.")
]
ClickhouseDatabase = Annotated[
    str,
    typer.Option(envvar="SLUICE_DEV_CLICKHOUSE_DATABASE", help="Database of Sluiceway's tables."),
]


@app.command()
def up(
    state_dir: StateDir = _DEFAULTS.state_dir,
    kafka_port: KafkaPort = _DEFAULTS.kafka_port,
    redis_port: RedisPort = _DEFAULTS.redis_port,
    clickhouse_tcp_port: ClickhouseTcpPort = _DEFAULTS.clickhouse_tcp_port,
    clickhouse_http_port: ClickhouseHttpPort = _DEFAULTS.clickhouse_http_port,
    clickhouse_database: ClickhouseDatabase = _DEFAULTS.clickhouse_database,
    kafka_controller_port: KafkaControllerPort = None,
    brokers: Brokers = _DEFAULTS.kafka_brokers,
    install: Annotated[
        bool,
        typer.Option(
            "--install/--no-install",
            envvar="SLUICE_DEV_INSTALL",
            help="Install missing servers (apt-get as root; Kafka's jars with Maven).",
        ),
    ] = True,
) -> None:
    """Start the parts that are not running, then create topics and tables."""
    config = _config(
        state_dir,
        kafka_port,
        redis_port,
        clickhouse_tcp_port,
        clickhouse_http_port,
        clickhouse_database,
        kafka_controller_port,
        brokers,
    )
    try:
        statuses = cluster.up(config, auto_install=install)
    except ClusterError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    _print_statuses(statuses)
    typer.echo(f"Point a shell at it: source {config.state_dir / 'cluster.env'}")


@app.command()
def down(
    state_dir: StateDir = _DEFAULTS.state_dir,
    wipe: Annotated[
        bool, typer.Option(help="Also delete data, logs and generated config files.")
    ] = False,
) -> None:
    """Stop the processes `up` started from this state directory (nothing else)."""
    stopped = cluster.down(ClusterConfig(state_dir=state_dir), wipe=wipe)
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@app.command()
def status(
    state_dir: StateDir = _DEFAULTS.state_dir,
    kafka_port: KafkaPort = _DEFAULTS.kafka_port,
    redis_port: RedisPort = _DEFAULTS.redis_port,
    clickhouse_tcp_port: ClickhouseTcpPort = _DEFAULTS.clickhouse_tcp_port,
    clickhouse_http_port: ClickhouseHttpPort = _DEFAULTS.clickhouse_http_port,
    clickhouse_database: ClickhouseDatabase = _DEFAULTS.clickhouse_database,
    kafka_controller_port: KafkaControllerPort = None,
    brokers: Brokers = _DEFAULTS.kafka_brokers,
) -> None:
    """Show each part's port, pid and health; exit code 1 unless all are healthy."""
    config = _config(
        state_dir,
        kafka_port,
        redis_port,
        clickhouse_tcp_port,
        clickhouse_http_port,
        clickhouse_database,
        kafka_controller_port,
        brokers,
    )
    statuses = cluster.status(config)
    _print_statuses(statuses)
    if not all(part.healthy for part in statuses):
        raise typer.Exit(1)


@app.command()
def env(
    state_dir: StateDir = _DEFAULTS.state_dir,
    kafka_port: KafkaPort = _DEFAULTS.kafka_port,
    redis_port: RedisPort = _DEFAULTS.redis_port,
    clickhouse_tcp_port: ClickhouseTcpPort = _DEFAULTS.clickhouse_tcp_port,
    clickhouse_http_port: ClickhouseHttpPort = _DEFAULTS.clickhouse_http_port,
    clickhouse_database: ClickhouseDatabase = _DEFAULTS.clickhouse_database,
    kafka_controller_port: KafkaControllerPort = None,
    brokers: Brokers = _DEFAULTS.kafka_brokers,
) -> None:
    """Print `export SLUICE_...` lines for this cluster: `eval "$(sluice dev env)"`."""
    config = _config(
        state_dir,
        kafka_port,
        redis_port,
        clickhouse_tcp_port,
        clickhouse_http_port,
        clickhouse_database,
        kafka_controller_port,
        brokers,
    )
    typer.echo(cluster.shell_exports(config), nl=False)


def _config(
    state_dir: Path,
    kafka_port: int,
    redis_port: int,
    clickhouse_tcp_port: int,
    clickhouse_http_port: int,
    clickhouse_database: str,
    kafka_controller_port: int | None = None,
    brokers: int = 1,
) -> ClusterConfig:
    try:
        return ClusterConfig(
            kafka_controller_port=kafka_controller_port,
            kafka_brokers=brokers,
            state_dir=state_dir,
            kafka_port=kafka_port,
            redis_port=redis_port,
            clickhouse_tcp_port=clickhouse_tcp_port,
            clickhouse_http_port=clickhouse_http_port,
            clickhouse_database=clickhouse_database,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _print_statuses(statuses: list[PartStatus]) -> None:
    table = Table("part", "port", "pid", "health", "detail")
    for part in statuses:
        if part.healthy:
            health = "[green]healthy[/]"
        else:
            health = "[red]unhealthy[/]" if part.running else "[red]stopped[/]"
        pid = str(part.pid) if part.pid is not None else "-"
        table.add_row(part.name, str(part.port), pid, health, part.detail)
    Console().print(table)
