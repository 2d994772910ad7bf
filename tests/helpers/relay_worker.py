"""A worker process for tests: relays each decoded event from one topic to another.

`python -m tests.helpers.relay_worker BOOTSTRAP INPUT OUTPUT GROUP [DELAY_S]` — the delay, if
given, is slept per batch so that a test can kill the process mid-stream.
"""

from __future__ import annotations

import sys
import time

from schemas.messages import Event
from services.common.settings import SluiceSettings
from services.common.worker import FixedBatch, KafkaWorker, Output, Record


def relay_to(output_topic: str, delay_s: float = 0.0):
    """A handler that copies every record to `output_topic`, tagged with where it came from."""

    def handle(records: list[Record]) -> list[Output]:
        if delay_s:
            time.sleep(delay_s)
        return [
            Output(
                topic=output_topic,
                value=record.raw,
                key=record.key,
                headers={"source": f"{record.partition}:{record.offset}"},
            )
            for record in records
        ]

    return handle


def main(argv: list[str]) -> None:
    bootstrap, input_topic, output_topic, group = argv[:4]
    delay_s = float(argv[4]) if len(argv) > 4 else 0.0
    worker = KafkaWorker(
        SluiceSettings(kafka_bootstrap=bootstrap),
        service="relay",
        group_id=group,
        topics=[input_topic],
        handler=relay_to(output_topic, delay_s),
        decoders={input_topic: Event},
        batch_policy=FixedBatch(max_messages=100, max_wait_s=0.05),
    )
    worker.run()


if __name__ == "__main__":
    main(sys.argv[1:])
