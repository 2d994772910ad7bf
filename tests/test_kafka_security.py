"""Kafka with SASL/SCRAM over TLS: the services' client settings against a broker that needs them.

A private cluster whose broker has a SASL_SSL listener (SCRAM-SHA-512, a self-signed
certificate) beside its plain one. Every service builds its producers, consumers and admin
clients from `services.common.kafka`, so those configs reaching the secure listener with the
`SLUICE_KAFKA_*` settings is what a user pointing Sluiceway at a secured Kafka relies on.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from deploy.local.cluster import ClusterConfig, down, up
from services.common.kafka import client_config, consumer_config, make_producer
from services.common.settings import SluiceSettings
from tests.support import read_topic

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def secure_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterConfig]:
    config = ClusterConfig.with_free_ports(tmp_path_factory.mktemp("secure"), secure=True)
    try:
        up(config, auto_install=False, stop_with_caller=True)
        yield config
    finally:
        down(config, wipe=True)


def settings_from(env: dict[str, str], **changes: str) -> SluiceSettings:
    values = {key.removeprefix("SLUICE_").lower(): value for key, value in env.items()}
    return SluiceSettings(**(values | changes))


def test_services_produce_and_consume_over_sasl_scram_and_tls(secure_cluster: ClusterConfig):
    settings = settings_from(secure_cluster.secure_env())
    assert settings.kafka_security_protocol == "SASL_SSL"
    topic = f"test.secure.{uuid.uuid4().hex[:8]}"
    admin = AdminClient(client_config(settings))
    admin.create_topics([NewTopic(topic, 2, 1)])[topic].result(30)

    producer = make_producer(settings)
    for i in range(50):
        producer.produce(topic, f"m{i}".encode(), key=str(i).encode())
    assert producer.flush(30) == 0

    config = consumer_config(settings, f"secure-{uuid.uuid4().hex[:6]}")
    got = read_topic(settings.kafka_bootstrap, topic, lambda got: len(got) >= 50, 30, config)
    assert sorted(m.value() for m in got) == sorted(f"m{i}".encode() for i in range(50))


def test_a_wrong_scram_password_is_refused(secure_cluster: ClusterConfig):
    settings = settings_from(secure_cluster.secure_env(), kafka_sasl_password="not-the-password")
    errors: list[KafkaError] = []
    producer = make_producer(settings, error_cb=errors.append, log_level=0)
    deadline = time.monotonic() + 20
    while not errors and time.monotonic() < deadline:
        producer.poll(0.2)

    assert errors and errors[0].code() == KafkaError._AUTHENTICATION, errors
    assert "invalid credentials" in errors[0].str()


def test_a_client_that_does_not_trust_the_broker_certificate_is_refused(
    secure_cluster: ClusterConfig,
):
    public_cas = "/etc/ssl/certs/ca-certificates.crt"  # none of them signed the broker's
    settings = settings_from(secure_cluster.secure_env(), kafka_ssl_ca_location=public_cas)
    admin = AdminClient(client_config(settings))

    with pytest.raises(KafkaException):
        admin.list_topics(timeout=10)
