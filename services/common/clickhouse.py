"""The ClickHouse client built from settings: the one place its connection options are set."""

from __future__ import annotations

from clickhouse_driver import Client

from services.common.settings import SluiceSettings


def clickhouse_client(settings: SluiceSettings, timeout_s: float = 10.0) -> Client:
    """A native-protocol client for the ClickHouse of the shared `clickhouse_*` settings.

    The session's default database is left alone (statements name the database explicitly), so
    connecting works before the tables exist. Every wait is bounded by `timeout_s`.
    """
    return Client(
        settings.clickhouse_host,
        port=settings.clickhouse_port,
        user=settings.clickhouse_user,
        password=settings.clickhouse_password.get_secret_value(),
        secure=settings.clickhouse_secure,
        connect_timeout=min(timeout_s, 5.0),
        send_receive_timeout=timeout_s,
        sync_request_timeout=timeout_s,
    )
