"""The services' Kafka producer surfaces fatal errors the way their handlers expect."""

from __future__ import annotations

import ctypes
import sys

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer

from services.common.kafka import ServiceProducer

_set_error = ctypes.pythonapi.PyErr_SetObject
_set_error.argtypes = [ctypes.py_object, ctypes.py_object]
_set_error.restype = None


def _fail_like_a_fatal_error(_error, _message) -> None:
    """A delivery callback that leaves a bare `KafkaError` as the pending exception: what
    confluent-kafka's own fatal-error path leaves behind when a callback runs in the same
    `flush`."""
    fatal = KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, "producer state lost", fatal=True)
    _set_error(KafkaError, fatal)


def _flush_failing(producer_class: type[Producer]) -> Exception | object:
    # log_level 0: the handle outlives the test (a crashed callback keeps a reference) and would
    # log its reconnects to nowhere until the session ends
    config = {"bootstrap.servers": "127.0.0.1:1", "message.timeout.ms": 10, "log_level": 0}
    producer = producer_class(config)
    producer.produce("t", b"x", on_delivery=_fail_like_a_fatal_error)
    try:
        producer.flush(5.0)
    except:  # noqa: E722 - the point: what arrives, whatever it is
        raised = sys.exc_info()[1]
    else:
        pytest.fail("flush raised nothing")
    if isinstance(raised, BaseException):
        raised.__traceback__ = None  # its frames hold the producer, which would keep reconnecting
    return raised


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="the faulty branch is Python < 3.12's")
def test_the_library_producer_raises_a_bare_kafka_error_that_no_except_clause_matches():
    raised = _flush_failing(Producer)
    # when this fails, confluent-kafka restores exceptions properly: drop ServiceProducer
    assert type(raised) is KafkaError
    assert not isinstance(raised, BaseException)


def test_the_service_producer_raises_it_as_kafka_exception_with_the_fatal_error():
    raised = _flush_failing(ServiceProducer)
    assert isinstance(raised, KafkaException)
    error = raised.args[0]
    assert error.fatal() and error.code() == KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER
