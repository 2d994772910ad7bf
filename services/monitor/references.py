"""Reference profiles of model versions, read from the model repository's manifests.

`<root>/<model>/<version>/manifest.json` is read with the manifest model and cached until the
file changes. A version without a manifest or without a reference profile has no drift checks;
that is logged once per version, not on every window. Names come from stored data, so they are
checked to be plain path segments (the registry's naming rules) before touching the disk.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from pydantic import ValidationError

from services.inference.client import Manifest

log = logging.getLogger(__name__)

_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION = re.compile(r"^[0-9]{1,18}$")


class References:
    """Manifests by (model, version), cached by file modification time."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._cache: dict[tuple[str, str], tuple[float, Manifest]] = {}
        self._reported: set[tuple[str, str]] = set()

    def manifest(self, model: str, version: str) -> Manifest | None:
        """The version's manifest, or None when it is missing or invalid (logged once)."""
        if not (_MODEL.match(model) and _VERSION.match(version)):
            return None
        path = self.root / model / version / "manifest.json"
        try:
            mtime = path.stat().st_mtime
        except OSError:
            self._report(model, version, "no manifest", str(path))
            return None
        cached = self._cache.get((model, version))
        if cached is not None and cached[0] == mtime:
            return cached[1]
        try:
            manifest = Manifest.load(path)
        except (OSError, ValidationError) as exc:
            self._report(model, version, "invalid manifest", f"{path}: {exc}")
            return None
        self._cache[(model, version)] = (mtime, manifest)
        if manifest.reference is None:
            self._report(model, version, "no reference profile: drift is not measured", str(path))
        return manifest

    def _report(self, model: str, version: str, problem: str, detail: str) -> None:
        if (model, version) not in self._reported:
            self._reported.add((model, version))
            log.warning(problem, extra={"model": model, "version": version, "detail": detail})
