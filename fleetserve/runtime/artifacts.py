"""The local disk cache of remote model artifacts (`storageUri`, `parameters.uri`).

A remote URI (s3://, gs://, http(s)://, any fsspec protocol but local paths) is downloaded once,
through fsspec, into `<root>/<slug>-<hash>`; local paths are used where they are and never
copied. An entry appears only complete: it is downloaded into a temporary sibling and renamed
into place, so its presence alone means "complete", also after a restart. One process per root.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

from fsspec.core import url_to_fs
from fsspec.utils import get_protocol

from fleetserve.errors import ModelLoadError

_TMP_PREFIX = ".tmp-"  # a name no entry can have: entries start with the URI's protocol


def is_remote(uri: str) -> bool:
    """True for URIs fetched into the cache (any fsspec protocol other than local paths / file://)."""
    return get_protocol(uri) not in ("file", "local")


def cache_key(uri: str) -> str:
    """URIs that name the same artifacts share one cache entry (a trailing slash changes nothing)."""
    return uri.rstrip("/")


def _entry_name(key: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", key)[:80]
    return f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def _file_name(key: str) -> str:
    """The name a single-file URI is saved under: its last path segment, without any query."""
    return unquote(urlsplit(key).path.rsplit("/", 1)[-1]) or "artifact"


class ArtifactCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        # Left by a crash mid-download (or mid-delete): never complete, so never worth keeping.
        for stale in self.root.glob(_TMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)

    def fetch(self, uri: str) -> Path:
        """The local copy of a remote `uri`: a folder if the URI names a folder, a file if it names a file.
        Downloaded once: later calls (also from a new ArtifactCache on the same root, e.g. after a restart)
        return the complete cached copy without touching the network. Blocking: callers run it on a worker thread.
        Thread-safe: concurrent fetches of one URI download it once. Raises fleetserve.errors.ModelLoadError
        with a clear message (naming the URI and the cause) when the download fails."""
        if not is_remote(uri):
            raise ValueError(f"not a remote URI, nothing to fetch: {uri}")
        key = cache_key(uri)
        final = self.root / _entry_name(key)
        with self._lock(final.name):
            if not final.is_dir():
                tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.root))
                try:
                    self._download(key, tmp)
                    os.rename(tmp, final)
                except Exception as exc:
                    if not final.is_dir():  # else another process renamed a complete copy first
                        raise ModelLoadError(f"cannot download {uri}: {type(exc).__name__}: {exc}") from exc
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
            # A single-file URI is saved alone in its entry, under its own name. (A folder holding
            # only one file named like the folder itself reads as that file: an accepted ambiguity.)
            only = list(final.iterdir())
            if len(only) == 1 and only[0].name == _file_name(key) and only[0].is_file():
                return only[0]
            return final

    def delete(self, uri: str) -> None:
        """Removes the cached copy of `uri` (no-op when absent)."""
        if not is_remote(uri):
            return  # a local path is never in the cache, and never ours to delete
        final = self.root / _entry_name(cache_key(uri))
        with self._lock(final.name):
            if final.is_dir():
                # Renamed away first, so a crash mid-delete cannot leave a partial entry behind.
                doomed = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.root))
                os.rename(final, doomed / "entry")
                shutil.rmtree(doomed, ignore_errors=True)

    def _lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    @staticmethod
    def _download(key: str, tmp: Path) -> None:
        # A fresh filesystem instance: no listing cached from before a delete, current env/config.
        fs, path = url_to_fs(key, skip_instance_cache=True)
        if not fs.isdir(path):
            fs.get([path], [str(tmp / _file_name(key))])
            return
        # Files listed, then fetched as explicit pairs: a recursive `get` also tries to download
        # the folder URLs themselves over HTTP, and checks every source with a costly `isdir`.
        prefix = path.rstrip("/") + "/"
        remote = [p for p in fs.find(path) if p.startswith(prefix)]
        if not remote:
            raise FileNotFoundError(f"{path} holds no files")
        local = []
        for p in remote:
            rel = p[len(prefix):]
            parts = (unquote(rel) if "http" in fs.protocol else rel).split("/")  # HTTP links are URL-quoted
            if "" in parts or ".." in parts or "." in parts:  # a hostile listing must not write outside tmp
                raise ValueError(f"unsafe file name in the listing: {p}")
            local.append(str(tmp.joinpath(*parts)))
        fs.get(remote, local)
