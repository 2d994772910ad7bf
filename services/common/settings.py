"""The one settings base: every tunable is a field here or in a service's subclass.

Values come from environment variables named `SLUICE_<FIELD>` (case-insensitive), e.g.
`SLUICE_KAFKA_BOOTSTRAP`, then from the defaults below, which point at the local dev cluster that
`sluice dev up` starts. Service-specific fields carry the service's name as a prefix
(`inference_max_batch_size` <- `SLUICE_INFERENCE_MAX_BATCH_SIZE`). Secrets are `SecretStr`, so
they never appear in logs or reprs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

LOCAL_KAFKA_PORT = 19092
LOCAL_REDIS_PORT = 16379
LOCAL_CLICKHOUSE_TCP_PORT = 19000
LOCAL_CLICKHOUSE_HTTP_PORT = 18123
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
"""Largest message value a consumer decodes (Apache Kafka's default `message.max.bytes` is
about this); bigger ones are dead-lettered as `message_too_large`."""


class SluiceSettings(BaseSettings):
    """Connection and runtime settings shared by every service."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_", extra="ignore", frozen=True)

    kafka_bootstrap: str = Field(
        f"127.0.0.1:{LOCAL_KAFKA_PORT}", description="Kafka bootstrap servers, comma-separated."
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="librdkafka `security.protocol`."
    )
    kafka_sasl_mechanism: str | None = Field(
        None, description="librdkafka `sasl.mechanism`, e.g. SCRAM-SHA-512 or PLAIN."
    )
    kafka_sasl_username: str | None = Field(None, description="SASL user name.")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password.")
    kafka_ssl_ca_location: str | None = Field(None, description="CA bundle for TLS to Kafka.")
    kafka_fetch_wait_max_ms: int = Field(
        500,
        ge=0,
        description="librdkafka `fetch.wait.max.ms`: how long the broker may hold a fetch that "
        "finds no data. Kafka answers a waiting fetch as soon as data arrives, so this adds no "
        "latency; it only sets how often an idle consumer asks again.",
    )
    kafka_session_timeout_ms: int = Field(
        6000,
        ge=1000,
        description="Consumer-group session timeout: how soon the partitions of a member that "
        "died move to the others. 6 s is the broker's default floor "
        "(`group.min.session.timeout.ms`).",
    )
    kafka_max_message_bytes: int = Field(
        DEFAULT_MAX_MESSAGE_BYTES,
        ge=1024,
        description="Largest message value a consumer decodes; a bigger one goes to "
        "`sluice.dlq` as `message_too_large` and the partition keeps flowing.",
    )
    redis_url: str = Field(
        f"redis://127.0.0.1:{LOCAL_REDIS_PORT}/0",
        description="Redis URL (`rediss://` for TLS); online features and routing tables.",
    )
    redis_password: SecretStr | None = Field(None, description="Redis AUTH password.")
    clickhouse_host: str = Field("127.0.0.1", description="ClickHouse host (native protocol).")
    clickhouse_port: int = Field(LOCAL_CLICKHOUSE_TCP_PORT, description="ClickHouse native port.")
    clickhouse_database: str = Field("sluice", description="ClickHouse database of our tables.")
    clickhouse_user: str = Field("default", description="ClickHouse user.")
    clickhouse_password: SecretStr = Field(SecretStr(""), description="ClickHouse password.")
    clickhouse_secure: bool = Field(False, description="TLS to ClickHouse.")
    model_repository: Path = Field(
        Path("models"),
        description="Root of the Triton-style model repository (inference, monitor, CLI).",
    )
    log_level: str = Field("INFO", description="Python log level name.")
    log_format: Literal["json", "text"] = Field("json", description="Log line format.")
    metrics_port: int = Field(
        0, ge=0, le=65535, description="Port of /metrics, /healthz, /readyz; 0 = do not serve."
    )


def settings_table(
    settings_class: type[BaseSettings] = SluiceSettings, own_only: bool = False
) -> str:
    """A Markdown table of every setting: env var, default, description (for README/docs).

    `own_only` leaves out the fields a subclass inherits from `SluiceSettings`.
    """
    prefix = settings_class.model_config.get("env_prefix", "")
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    base = SluiceSettings.model_fields if own_only else {}
    for name, field in settings_class.model_fields.items():
        if name in base and field.default == base[name].default:
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, SecretStr):
            default = "(empty)" if not default.get_secret_value() else "(set)"
        shown = "" if default is None or default == "" else f"`{default}`"
        rows.append(f"| `{prefix}{name.upper()}` | {shown} | {field.description or ''} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
