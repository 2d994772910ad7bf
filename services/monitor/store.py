"""The monitor's one door to ClickHouse: columnar inserts, parameterised queries, and one typed
error for "ClickHouse cannot take this now".

Every failure of the connection or the server surfaces as `StoreUnavailable`, which callers treat
as transient: the sink retries the batch without committing offsets, the analyzer retries the
window on its next cycle. That includes server-side errors such as a missing table or too many
parts: data is never dropped because ClickHouse refused it; the retries metric and the logs say
why. A `clickhouse_driver.Client` is not thread-safe, so each thread owns its own `Store`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from clickhouse_driver import Client
from clickhouse_driver.errors import Error as DriverError

from schemas.clickhouse import TABLES
from services.common.clickhouse import clickhouse_client
from services.common.settings import SluiceSettings

log = logging.getLogger(__name__)

MONITOR_TABLES = ("events", "predictions", "labels", "drift", "quality", "health")
"""The tables the monitor writes and whose DDL it owns."""


class StoreUnavailable(Exception):
    """ClickHouse could not be reached or refused the statement; try again later."""


class Store:
    """A ClickHouse connection for one thread; `db` is the database of our tables."""

    def __init__(self, client: Client, database: str) -> None:
        self.client = client
        self.db = database

    @classmethod
    def from_settings(cls, settings: SluiceSettings, timeout_s: float = 30.0) -> Store:
        """Connect lazily (first statement) with the shared `clickhouse_*` settings.

        The session's default database is left alone (statements name `{db}` explicitly), so
        connecting works before `ensure_tables` has created the database.
        """
        client = clickhouse_client(settings, timeout_s)
        return cls(client, settings.clickhouse_database)

    def insert(self, table: str, columns: Mapping[str, Sequence[Any]]) -> int:
        """Insert rows given column by column (all of equal length); returns the row count.

        Values travel as parameters of a columnar insert, never inlined into the SQL.
        """
        names = list(columns)
        rows = len(columns[names[0]]) if names else 0
        if rows == 0:
            return 0
        statement = f"INSERT INTO {self.db}.{table} ({', '.join(names)}) VALUES"
        try:
            self.client.execute(statement, [columns[name] for name in names], columnar=True)
        except (DriverError, OSError, EOFError) as exc:
            self.client.disconnect()
            raise StoreUnavailable(f"insert into {table} failed: {_short(exc)}") from exc
        return rows

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple]:
        """Run a SELECT; `{db}` in `sql` is our database, `%(name)s` a parameter."""
        try:
            return self.client.execute(sql.format(db=self.db), params or {})
        except (DriverError, OSError, EOFError) as exc:
            self.client.disconnect()
            raise StoreUnavailable(f"query failed: {_short(exc)}") from exc

    def server_time_s(self) -> int:
        """ClickHouse's clock, epoch seconds (what `DEFAULT now()` columns use)."""
        return int(self.query("SELECT toUInt32(now())")[0][0])

    def ensure_tables(self, wait_s: float = 60.0) -> None:
        """Create the database and the monitor's tables if missing, waiting for ClickHouse."""
        statements = [f"CREATE DATABASE IF NOT EXISTS {self.db}"] + [
            TABLES[name].format(db=self.db).strip() for name in MONITOR_TABLES
        ]
        deadline = time.monotonic() + wait_s
        while True:
            try:
                for statement in statements:
                    self.client.execute(statement)
                return
            except (DriverError, OSError, EOFError) as exc:
                self.client.disconnect()
                if time.monotonic() > deadline:
                    raise StoreUnavailable(f"cannot create tables: {_short(exc)}") from exc
                log.warning("clickhouse not ready", extra={"error": _short(exc)})
                time.sleep(1.0)


def _short(exc: BaseException) -> str:
    """The first line of a driver error (server errors carry a stack trace after it)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
