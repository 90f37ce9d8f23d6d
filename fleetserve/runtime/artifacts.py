"""The local disk cache of remote model artifacts (`storageUri`, `parameters.uri`), and which
storage a model may name.

A remote URI (s3://, gs://, http(s)://, any fsspec protocol but local paths) is downloaded once,
through fsspec, into `<root>/<slug>-<hash>`; local paths are used where they are and never
copied. An entry appears only complete: it is downloaded into a temporary sibling and renamed
into place, so its presence alone means "complete", also after a restart. One process per root.
A downloaded archive (.tar.gz, .tgz, .tar, .zip, ...) is unpacked into its entry.

Hostile storage cannot reach past its entry or the limits: an archive member that would land
outside the entry (`..`, an absolute path, a link out, a device) fails the download; every
download has a size cap (what an archive unpacks to included) and a deadline; HTTP(S) follows at
most MAX_REDIRECTS redirects, each checked against the allowed prefixes before it is followed.
`check` says whether a model may name a URI at all: /dev, /proc and /sys never, and with an
allow list only what starts with one of its prefixes.

Credentials written in a URI (`s3://KEY:SECRET@bucket`, `https://user:pass@host`, a signed query)
never leave this module: URIs are shown through `redact`, library messages through `redact_text`,
and entry names are made from the redacted URI.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import Sequence
from urllib.parse import unquote, urlsplit, urlunsplit

from fsspec.callbacks import Callback
from fsspec.core import url_to_fs
from fsspec.utils import get_protocol

from fleetserve.errors import InvalidInput, ModelLoadError
from fleetserve.runtime.memory import format_bytes

log = logging.getLogger(__name__)

_TMP_PREFIX = ".tmp-"  # a name no entry can have: entries start with the URI's protocol
GIB = 1024**3
MAX_REDIRECTS = 5
# A connection or read that waits this long for bytes fails, whatever the overall deadline.
READ_TIMEOUT = 30.0
# A download still running after this many seconds logs its progress, then again every as many.
PROGRESS_EVERY = 5.0
ARCHIVES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")
_SYSTEM = ("/dev", "/proc", "/sys")

# `scheme://userinfo@`: plain userinfo, or `user:secret@` whose secret holds a '/' (AWS secret
# keys often do) and so reads to a URL parser as a path; but not `host:port/path@...`, a path
# with an '@' in it. Shown as `scheme://***@`.
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^@/?#]*@|[^@/?#:]*:(?!\d+/)[^@?#]*@)")
_USERINFO_IN_TEXT = re.compile(
    r"([A-Za-z][A-Za-z0-9+.-]*://)([^@\s/?#'\"]*@|[^@\s/?#:'\"]*:(?!\d+/)[^@\s?#'\"]*@)")
_QUERY_IN_TEXT = re.compile(r"(://[^\s'\"?#]*)\?[^\s'\"#]*")


def redact(uri: str) -> str:
    """`uri` as it may be shown: without the credentials it may carry (`user:password@`, a signed query)."""
    shown = _USERINFO.sub(r"\1***@", uri, count=1)
    query = shown.find("?")
    return shown if query < 0 else shown[:query] + "?***"


def redact_text(text: str, uri: str = "") -> str:
    """`text` (a library's message, a log line) with any URI's credentials, and those of `uri`
    wherever they appear on their own, replaced by ***."""
    match = _USERINFO.match(uri)
    if match:
        userinfo = match.group(2)[:-1]
        user, _, password = userinfo.partition(":")
        for secret in sorted({userinfo, unquote(userinfo), password, unquote(password), user}, key=len, reverse=True):
            if len(secret) >= 4:  # shorter ones would mangle ordinary words
                text = text.replace(secret, "***")
    text = _USERINFO_IN_TEXT.sub(r"\1***@", text)
    return _QUERY_IN_TEXT.sub(r"\1?***", text)


def size_on_disk(path: Path) -> int:
    """Bytes of a file, or of the files under a folder (links to files followed, links to folders
    not); 0 for anything else."""
    if path.is_file():
        return _file_size(str(path))
    return sum(_file_size(os.path.join(folder, name)) for folder, _, files in os.walk(path) for name in files)


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:  # a broken link, or gone meanwhile
        return 0


def is_remote(uri: str) -> bool:
    """True for URIs fetched into the cache (any fsspec protocol other than local paths / file://)."""
    return get_protocol(uri) not in ("file", "local")


def cache_key(uri: str) -> str:
    """URIs that name the same artifacts share one cache entry (a trailing slash changes nothing)."""
    return uri.rstrip("/")


def _entry_name(key: str) -> str:
    # The hash is of the whole key: the same place reached with other credentials is another entry.
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", redact(key))[:80]
    return f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def _file_name(key: str) -> str:
    """The name a single-file URI is saved under: its last path segment, without any query."""
    return unquote(urlsplit(key).path.rsplit("/", 1)[-1]) or "artifact"


def _place(uri: str, base: Path) -> tuple[str, str, str]:
    """(scheme, host, path) compared against the allowed prefixes: a local path resolved (so '..'
    and symlinks cannot pass a prefix), a URL's host lower-cased without credentials, its path
    unquoted and normalised."""
    if not is_remote(uri):
        return "file", "", os.path.realpath(base / uri.removeprefix("file://"))
    parts = urlsplit(uri)  # parsed as the clients parse it: `_USERINFO`'s guess at credentials could be a path
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    path = posixpath.normpath(unquote(parts.path)) if parts.path else ""
    return parts.scheme.lower(), host, path.rstrip("/")


def _admits(prefix: tuple[str, str, str], place: tuple[str, str, str]) -> bool:
    """Whether `place` starts with `prefix` at a path boundary: s3://bucket admits s3://bucket/x, not s3://bucket-evil."""
    return prefix[:2] == place[:2] and (place[2] == prefix[2] or place[2].startswith(prefix[2].rstrip("/") + "/"))


class _Refused(Exception):
    """A download stopped by a limit or the allow list; the message says which. (Not a ValueError,
    which fsspec's HTTP listing would take for "not a folder".)"""


class _Budget(Callback):
    """The bytes and time left to one download, shared by all its files (fsspec gives each file a
    child callback, `branched`, told its size when known and every chunk written). A download
    that takes longer than PROGRESS_EVERY logs its progress: bytes so far and the rate."""

    def __init__(self, max_bytes: int, timeout: float, shown: str):
        super().__init__()
        self.max_bytes, self.timeout, self.shown = max_bytes, timeout, shown
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.next_report = self.started + PROGRESS_EVERY
        self.written = 0
        self.announced = 0  # the bytes the files said they would have, where they said

    def report(self, now: float, done: bool = False) -> None:
        rate = self.written / max(now - self.started, 1e-9)
        of = f" of {format_bytes(self.announced)}" if self.announced and not done else ""
        log.info("%s %s: %s%s in %.0f s (%s/s)", "downloaded" if done else "downloading", self.shown,
                 format_bytes(self.written), of, now - self.started, format_bytes(rate))
        self.next_report = now + PROGRESS_EVERY

    def finished(self) -> None:
        if self.next_report > self.started + PROGRESS_EVERY:  # progress was shown: say it ended
            self.report(time.monotonic(), done=True)

    def branched(self, path_1, path_2, **kwargs) -> Callback:
        return _FileBudget(self)

    def refuse_past(self, size: int) -> None:
        if size > self.max_bytes:
            raise _Refused(f"larger than --max-download-size ({self.max_bytes:,} bytes)")


class _FileBudget(Callback):
    def __init__(self, budget: _Budget):
        super().__init__()
        self.budget = budget

    def set_size(self, size):
        if size is not None:  # the announced size: refused before a byte is written
            self.budget.refuse_past(self.budget.written + size)
            self.budget.announced += size

    def relative_update(self, inc=1):
        budget = self.budget
        budget.written += inc
        budget.refuse_past(budget.written)
        now = time.monotonic()
        if now > budget.deadline:
            raise _Refused(f"took longer than --download-timeout ({budget.timeout:g} s)")
        if now >= budget.next_report:
            budget.report(now)


class ArtifactCache:
    def __init__(self, root: str | os.PathLike, allowed: Sequence[str] = (), max_bytes: int = 10 * GIB,
                 timeout: float = 1800.0):
        """`allowed`: the prefixes a URI must start with (none: any); `max_bytes` and `timeout`
        bound each download."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.allowed = [_place(prefix, Path.cwd()) for prefix in allowed]
        self.shown_allowed = ", ".join(redact(prefix) for prefix in allowed)
        self.max_bytes, self.timeout = max_bytes, timeout
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        # Left by a crash mid-download (or mid-delete): never complete, so never worth keeping.
        for stale in self.root.glob(_TMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)

    def check(self, uri: str, base: Path) -> None:
        """Raises InvalidInput unless a model may take its artifacts from `uri` (a relative path
        is relative to `base`)."""
        try:
            place = _place(uri, base)
        except ValueError as error:  # a URL that does not parse (a bad port, say)
            raise InvalidInput(f"storage {redact(uri)!r} is not a valid URI: {redact_text(str(error), uri)}") from None
        # Before symlinks are followed too: /proc/self/root/... resolves elsewhere.
        paths = (place[2], os.path.normpath(base / uri.removeprefix("file://"))) if place[0] == "file" else ()
        if any(path == top or path.startswith(top + "/") for path in paths for top in _SYSTEM):
            raise InvalidInput(f"storage {redact(uri)!r} is refused: models never come from /dev, /proc or /sys")
        if self.allowed and not any(_admits(prefix, place) for prefix in self.allowed):
            raise InvalidInput(
                f"storage {redact(uri)!r} is outside the allowed storage ({self.shown_allowed}); "
                "the server's --allowed-storage lists the prefixes a storageUri or uri must start with"
            )

    def fetch(self, uri: str) -> Path:
        """The local copy of a remote `uri`: a folder if the URI names a folder or an archive, a file
        if it names a file. Downloaded once: later calls (also from a new ArtifactCache on the same
        root, e.g. after a restart) return the complete cached copy without touching the network.
        Blocking: callers run it on a worker thread. Thread-safe: concurrent fetches of one URI
        download it once. Raises fleetserve.errors.ModelLoadError with a clear message (naming the
        URI, redacted, and the cause) when the download fails or is refused."""
        if not is_remote(uri):
            raise ValueError(f"not a remote URI, nothing to fetch: {redact(uri)}")
        key = cache_key(uri)
        final = self.root / _entry_name(key)
        with self._lock(final.name):
            if not final.is_dir():
                tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.root))
                try:
                    os.rename(self._download(key, tmp), final)
                except Exception as exc:
                    if not final.is_dir():  # else another process renamed a complete copy first
                        raise ModelLoadError(f"cannot download {redact(uri)}: {self._reason(exc, uri)}") from None
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

    def _download(self, key: str, tmp: Path) -> Path:
        """Downloads `key` under `tmp`; returns the folder that becomes its entry."""
        # A fresh filesystem instance: no listing cached from before a delete, current env/config.
        fs, path = url_to_fs(key, skip_instance_cache=True, **self._options(get_protocol(key)))
        budget = _Budget(self.max_bytes, self.timeout, redact(key))
        name = _file_name(key)
        if name.lower().endswith(ARCHIVES) or not fs.isdir(path):
            fs.get([path], [str(tmp / name)], callback=budget)
            budget.finished()
            if not name.lower().endswith(ARCHIVES):
                return tmp
            unpacked = tmp / "unpacked"  # not a name an archive has
            _unpack(tmp / name, unpacked, self.max_bytes)
            return unpacked
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
        fs.get(remote, local, callback=budget)
        budget.finished()
        return tmp

    def _options(self, protocol: str) -> dict:
        """fsspec options for `protocol`: for HTTP(S), aiohttp's timeouts and a redirect guard."""
        if protocol not in ("http", "https"):
            return {}
        import aiohttp  # fsspec's HTTP filesystem needs it anyway

        wait = min(READ_TIMEOUT, self.timeout)
        # `total` bounds what no callback sees (a listing); a file's bytes meet the deadline in _Budget.
        total = aiohttp.ClientTimeout(total=self.timeout + wait, sock_connect=wait, sock_read=wait)
        client: dict = {"timeout": total}
        if self.allowed:
            client["middlewares"] = (self._within_allowed,)  # sees every request, each redirect's too
        return {"client_kwargs": client, "max_redirects": MAX_REDIRECTS}

    async def _within_allowed(self, request, handler):
        url = str(request.url)
        if not any(_admits(prefix, _place(url, Path.cwd())) for prefix in self.allowed):
            raise _Refused(f"a redirect to {redact(url)} leaves the allowed storage ({self.shown_allowed})")
        return await handler(request)

    def _reason(self, error: Exception, uri: str) -> str:
        if isinstance(error, (_Refused, _Unsafe)):
            reason = str(error)
        elif (aiohttp := sys.modules.get("aiohttp")) and isinstance(error, aiohttp.TooManyRedirects):
            reason = f"more than {MAX_REDIRECTS} redirects"
        elif isinstance(error, TimeoutError):  # aiohttp's connect and read timeouts, fsspec's own
            reason = (f"timed out: no bytes for {min(READ_TIMEOUT, self.timeout):g} s, or longer than "
                      f"--download-timeout ({self.timeout:g} s)")
        else:
            reason = f"{type(error).__name__}: {error}"
        return redact_text(reason, uri)


class _Unsafe(Exception):
    """An archive member that would land outside its folder, or an archive past the size cap."""


_FILTER_REASONS = {  # tarfile's own messages name the server's temporary paths
    getattr(tarfile, name): reason for name, reason in (
        ("AbsolutePathError", "an absolute path"),
        ("OutsideDestinationError", "it would land outside the folder"),
        ("SpecialFileError", "a device or other special file"),
        ("AbsoluteLinkError", "a link to an absolute path"),
        ("LinkOutsideDestinationError", "a link that points outside the folder"),
    ) if hasattr(tarfile, name)  # Pythons before 3.11.4 (Debian 12's 3.11.2) have no filters
}


def _unpack(archive: Path, target: Path, max_bytes: int) -> None:
    """Unpacks `archive` into `target`; refuses members that would land outside it and more than
    `max_bytes` in all (a small archive can hold a huge file)."""
    total = 0

    def count(size: int) -> None:
        nonlocal total
        total += size
        if total > max_bytes:
            raise _Unsafe(f"the archive {archive.name} unpacks to more than --max-download-size ({max_bytes:,} bytes)")

    if archive.name.lower().endswith(".zip"):
        with zipfile.ZipFile(archive) as zipped:
            for member in zipped.infolist():
                parts = PurePosixPath(member.filename.replace("\\", "/")).parts
                if member.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                    raise _Unsafe(f"the archive {archive.name} has a member outside its folder: {member.filename!r}")
                if stat.S_ISLNK(member.external_attr >> 16):
                    raise _Unsafe(f"the archive {archive.name} has a link: {member.filename!r}")
                count(member.file_size)
            zipped.extractall(target)
        return

    def data_only(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
        # Python's "data" filter refuses '..', links out and device files (absolute names it would
        # only make relative: refused here, as in a zip).
        _refuse_absolute(member, archive.name)
        try:
            member = tarfile.data_filter(member, path)
        except tarfile.FilterError as error:
            why = _FILTER_REASONS.get(type(error), "not a plain file or folder inside it")
            raise _unsafe_member(archive.name, member, why) from None
        count(member.size)
        return member

    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(target, filter=data_only)
        else:
            tar.extractall(target, members=[_checked(member, archive.name, target, count) for member in tar])


def _checked(member: tarfile.TarInfo, archive: str, target: Path, count) -> tarfile.TarInfo:
    """What the "data" filter refuses, for a Python without it: names that leave the folder, and
    anything but files and folders. Links are refused outright, as in a zip: checked before they
    exist on disk, a chain of them could lead a later member outside. What is kept gets plain
    modes and owner."""
    _refuse_absolute(member, archive)
    root = os.path.realpath(target)
    if not os.path.realpath(os.path.join(root, member.name)).startswith(root + os.sep):
        raise _unsafe_member(archive, member, "it would land outside the folder")
    if member.issym() or member.islnk():
        raise _unsafe_member(archive, member, "a link (refused where this Python's tarfile has no extraction filters)")
    if not (member.isfile() or member.isdir()):
        raise _unsafe_member(archive, member, "a device or other special file")
    count(member.size)
    member.mode = 0o755 if member.isdir() or member.mode & 0o100 else 0o644
    member.uid, member.gid, member.uname, member.gname = os.getuid(), os.getgid(), "", ""
    return member


def _refuse_absolute(member: tarfile.TarInfo, archive: str) -> None:
    if member.name.startswith(("/", "\\")):
        raise _unsafe_member(archive, member, "an absolute path")


def _unsafe_member(archive: str, member: tarfile.TarInfo, why: str) -> _Unsafe:
    return _Unsafe(f"the archive {archive} has an unsafe member {member.name!r}: {why}")
