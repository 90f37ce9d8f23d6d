"""Applied manifests kept in --state-dir, so a restarted server comes back with what was applied.

One JSON file per manifest, `<state-dir>/manifests/<kind>/<name>.json`, written whole and then
renamed into place: a crash leaves the old file or the new one, never half of either. The files
hold the manifests as applied, storageUri credentials included, as etcd holds them for a fleet.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import orjson

from fleetserve.graph.manifests import SUPPORTED_KINDS
from fleetserve.settings import check_model_name

log = logging.getLogger(__name__)


class AppliedManifests:
    """Without a state folder, nothing is kept."""

    def __init__(self, state_dir: str):
        self.folder = Path(state_dir) / "manifests" if state_dir else None

    def record(self, kind: str, name: str, manifest: dict) -> None:
        """Kept, readable by this user only (a storageUri may hold credentials). A manifest that
        cannot be kept is logged: it stays applied until the process stops."""
        if self.folder is None:
            return
        path = self._path(kind, name)
        written = path.with_suffix(".json.tmp")
        try:
            # YAML allows keys JSON has not (numbers, dates): kept as their text.
            content = orjson.dumps(manifest, default=str, option=orjson.OPT_NON_STR_KEYS)
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(os.open(written, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as file:
                file.write(content)
            os.replace(written, path)
        except (OSError, TypeError) as error:
            log.error("cannot keep the applied %s %s in %s: %s", kind.lower(), name, self.folder, error)

    def forget(self, kind: str, name: str) -> None:
        if self.folder is not None:
            self._path(kind, name).unlink(missing_ok=True)

    def saved(self) -> list[dict]:
        """Every recorded manifest, models first, then pipelines, then experiments; a file that cannot be read is logged and skipped."""
        if self.folder is None:
            return []
        manifests = []
        for kind in SUPPORTED_KINDS:
            for path in sorted((self.folder / kind.lower()).glob("*.json")):
                try:
                    manifest = orjson.loads(path.read_bytes())
                except (OSError, orjson.JSONDecodeError) as error:
                    log.error("cannot read the applied manifest %s: %s", path, error)
                    continue
                if isinstance(manifest, dict) and manifest.get("kind") == kind:
                    manifests.append(manifest)
                else:
                    log.error("the applied manifest %s is no %s manifest: skipped", path, kind)
        return manifests

    def _path(self, kind: str, name: str) -> Path:
        return self.folder / kind.lower() / f"{check_model_name(name)}.json"
