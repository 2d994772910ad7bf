"""The control plane of an inference process: follows `sluice.models` and `sluice.routing`.

Every inference process reads both compacted topics from the beginning on its own (by partition
assignment, not a consumer group), so each one knows every routing table and every registered
version. A routing table that names a version not loaded yet loads it from the repository first,
so traffic never moves to a version that cannot serve.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from confluent_kafka import Consumer

from schemas.messages import ModelRegistered, RoutingTable
from schemas.topics import MODELS, ROUTING
from services.common.codec import DecodeError, decode
from services.common.kafka import assign_from_beginning, consumer_config, follow
from services.inference.service import InferenceService
from services.inference.settings import InferenceSettings

log = logging.getLogger(__name__)


class ControlPlane:
    """Applies registrations and routing changes to an `InferenceService` from a thread."""

    def __init__(self, settings: InferenceSettings, service: InferenceService) -> None:
        self.service = service
        self.root = Path(settings.model_repository)
        self.caught_up = threading.Event()
        self._stop = threading.Event()
        config = consumer_config(
            settings, "sluice-inference-control", **{"enable.partition.eof": True}
        )
        self.consumer = Consumer(config)
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

    def _loop(self) -> None:
        follow(self.consumer, self._pending_eof, self.caught_up, self._stop, self._apply_safely)

    def _apply_safely(self, topic: str, value: bytes | None) -> None:
        try:
            self.apply(topic, value)
        except Exception:  # noqa: BLE001 - a bad control message must not stop the plane
            log.exception("control message not applied", extra={"topic": topic})

    def apply(self, topic: str, value: bytes | None) -> None:
        """Apply one control message (exposed for tests)."""
        if value is None:
            return
        try:
            if topic == MODELS.name:
                self._apply_model(decode(ModelRegistered, value))
            else:
                self._apply_routing(decode(RoutingTable, value))
        except DecodeError as exc:
            log.warning("undecodable control message", extra={"error": exc.body.message})

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
