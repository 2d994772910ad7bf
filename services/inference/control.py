"""The control plane of an inference process: follows `sluice.models` and `sluice.routing`.

Every inference process reads both compacted topics from the beginning on its own (by partition
assignment, not a consumer group), so each one knows every routing table and every registered
version. A routing table that names a version not loaded yet loads it from the repository first,
so traffic never moves to a version that cannot serve. A control message that cannot be
decoded goes to `sluice.dlq` and the plane keeps following.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from confluent_kafka import Consumer

from schemas.messages import ModelRegistered, RoutingTable
from schemas.topics import MODELS, ROUTING
from services.common.codec import decode
from services.common.kafka import DeadLetters, assign_from_beginning, consumer_config, follow
from services.inference.registry import RegistryError
from services.inference.service import InferenceService
from services.inference.settings import InferenceSettings

log = logging.getLogger(__name__)

CONTROL_GROUP = "sluice-inference-control"
"""Group id of the control-plane consumer; it never joins or commits (partition assignment), so
it only names the consumer in dead letters."""


class ControlPlane:
    """Applies registrations and routing changes to an `InferenceService` from a thread."""

    def __init__(self, settings: InferenceSettings, service: InferenceService) -> None:
        self.service = service
        self.root = Path(settings.model_repository)
        self.caught_up = threading.Event()
        self._stop = threading.Event()
        self.max_message_bytes = settings.kafka_max_message_bytes
        config = consumer_config(settings, CONTROL_GROUP, **{"enable.partition.eof": True})
        self.consumer = Consumer(config)
        self.dead_letters = DeadLetters(settings, CONTROL_GROUP)
        self._pending_eof: set[tuple[str, int]] = set()
        self._thread = threading.Thread(target=self._loop, name="control-plane", daemon=True)

    def start(self) -> None:
        """Assign both topics from their beginning and start following them."""
        self._pending_eof = assign_from_beginning(self.consumer, [MODELS.name, ROUTING.name])
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.consumer.close()
        self.dead_letters.close()

    def _loop(self) -> None:
        follow(
            self.consumer,
            self._pending_eof,
            self.caught_up,
            self._stop,
            self.apply,
            self.dead_letters,
        )

    def apply(self, topic: str, value: bytes | None) -> None:
        """Apply one control message (exposed for tests); a tombstone is ignored.

        Raises `DecodeError` for a message that is not a valid `ModelRegistered` or
        `RoutingTable` (the follow loop dead-letters it). A version that cannot be loaded from
        this process's repository (`RegistryError`) leaves the routing as it was, with a
        warning: traffic never moves to a version that cannot serve.
        """
        if value is None:
            return
        limit = self.max_message_bytes
        try:
            if topic == MODELS.name:
                self._apply_model(decode(ModelRegistered, value, limit))
            else:
                self._apply_routing(decode(RoutingTable, value, limit))
        except RegistryError as exc:
            # expected wherever processes serve different repositories (several teams on one
            # cluster, the shared test cluster): the previous state stays, no traceback
            log.warning("control message not applied", extra={"topic": topic, "error": str(exc)})

    def _apply_model(self, event: ModelRegistered) -> None:
        loaded = self.service.versions.get(event.model, {}).get(event.version)
        if event.action == "removed":
            table = self.service.tables.get(event.model)
            if table is not None and any(e.version == event.version for e in table.entries):
                log.warning("not unloading a routed version", extra={"version": event.version})
                return
            self.service.unload_version(event.model, event.version)
        elif loaded is None or loaded.manifest.sha256 != event.sha256:
            self.service.load_version(self._folder(event.model, event.version, event.path))

    def _apply_routing(self, table: RoutingTable) -> None:
        for entry in table.entries:
            if entry.version not in self.service.versions.get(table.model, {}):
                self.service.load_version(self._folder(table.model, entry.version))
        self.service.apply_routing(table)

    def _folder(self, model: str, version: str, path: str = "") -> Path:
        candidate = Path(path) if path else None
        if candidate is not None and (candidate / "manifest.json").exists():
            return candidate
        return self.root / model / version
