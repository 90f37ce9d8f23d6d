"""Finds models in a repository folder.

A model is a folder holding `model-settings.json` (MLServer's format), or numbered version
sub-folders, each with the artifacts of one version and optionally its own
`model-settings.json` (else the parent's is shared). A Triton model folder (`config.pbtxt`) is
one model: its numbered folders are Triton's versions. The folder name is the default model name.
A folder that cannot be read becomes an entry with its reason: it never hides the others.

Beside the folders, one model may be described by the environment (MLServer's MLSERVER_MODEL_*
variables, which KServe sets): it is found as if its settings were a model-settings.json.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fleetserve.errors import ModelLoadError, NotFound, describe
from fleetserve.settings import ModelSettings, check_model_name

log = logging.getLogger(__name__)

SETTINGS_FILE = "model-settings.json"


TRITON_CONFIG = "config.pbtxt"


def is_version_number(name: str) -> bool:
    return name.isascii() and name.isdecimal()


@dataclass
class Found:
    """What the repository says about one model name: its versions, or why it cannot load."""

    name: str
    versions: list[ModelSettings]
    error: str | None = None
    manifest: dict | None = None  # the Model manifest it was applied as, if it was


class ModelRepository:
    def __init__(self, root: str | Path | None, described: dict | None = None):
        self.root = Path(root).resolve() if root else None
        self.described = described  # settings.mlserver_model(): model-settings.json's fields

    def scan(self) -> dict[str, Found]:
        """Every model in the repository, keyed by name; broken ones carry their reason."""
        found: dict[str, Found] = {}
        if self.described is not None:
            entry = self._read_described()
            found[entry.name] = entry
        if self.root is None:
            return found
        for folder in sorted(path for path in self.root.iterdir() if path.is_dir() and not path.name.startswith(".")):
            if not self._is_model_folder(folder):
                continue
            entry = self._read_folder(folder)
            if entry.name in found:
                log.warning("model %s in %s is also defined in another folder; using the first", entry.name, folder)
                continue
            found[entry.name] = entry
        return found

    def find(self, name: str) -> Found:
        """One model: its own folder first (one read), else a full scan for a name set in settings."""
        check_model_name(name)
        if self.described is not None and (entry := self._read_described()).name == name:
            return entry
        if self.root is not None:
            folder = self.root / name
            if folder.is_dir() and self._is_model_folder(folder):
                entry = self._read_folder(folder)
                if entry.name == name:
                    return entry
        entry = self.scan().get(name)
        if entry is None:
            raise NotFound(f"model '{name}' is not in the repository {self.root}")
        return entry

    def is_described(self, name: str) -> bool:
        return self.described is not None and self.described["name"] == name

    def _read_described(self) -> Found:
        uri = self.described["parameters"].get("uri")
        folder = Path(uri).resolve() if uri else (self.root or Path.cwd())
        try:
            settings = ModelSettings.parse(self.described, folder if folder.is_dir() else folder.parent,
                                           self.described["name"])
        except ModelLoadError as error:
            return Found(self.described["name"], [], error.message)
        settings.from_manifest = True  # a model-settings.json among its artifacts fills in the rest
        return Found(settings.name, [settings])

    @staticmethod
    def _version_folders(folder: Path) -> list[Path]:
        return sorted((p for p in folder.iterdir() if p.is_dir() and is_version_number(p.name)), key=lambda p: int(p.name))

    def _is_model_folder(self, folder: Path) -> bool:
        return (folder / SETTINGS_FILE).is_file() or any(
            (version / SETTINGS_FILE).is_file() for version in self._version_folders(folder)
        )

    def _read_folder(self, folder: Path) -> Found:
        try:
            versions = self._read(folder)
        except ModelLoadError as error:
            return Found(folder.name, [], error.message)
        except Exception as error:  # an unreadable file: the reason belongs to this model only
            return Found(folder.name, [], f"{folder}: {describe(error)}")
        return Found(versions[0].name, versions)

    def _read(self, folder: Path) -> list[ModelSettings]:
        shared = folder / SETTINGS_FILE
        version_folders = self._version_folders(folder)
        if not version_folders or (folder / TRITON_CONFIG).is_file():  # a Triton model folder keeps its versions itself
            return [ModelSettings.from_file(shared, folder.name)]
        versions: list[ModelSettings] = []
        for version_folder in version_folders:
            own = version_folder / SETTINGS_FILE
            if own.is_file():
                settings = ModelSettings.from_file(own, folder.name, version_folder.name)
            elif shared.is_file():
                settings = ModelSettings.from_file(shared, folder.name, version_folder.name)
                settings.folder = version_folder
                settings.version = version_folder.name
            else:
                raise ModelLoadError(f"{version_folder}: no {SETTINGS_FILE} in it or in {folder}")
            clash = next((other for other in versions if other.version == settings.version), None)
            if clash is not None:
                raise ModelLoadError(f"{folder}: {clash.folder.name}/ and {version_folder.name}/ both declare version {settings.version}")
            versions.append(settings)
        names = {settings.name for settings in versions}
        if len(names) != 1:
            raise ModelLoadError(f"{folder}: version folders name different models {sorted(names)}")
        return versions
