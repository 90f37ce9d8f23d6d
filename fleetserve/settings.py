"""Server settings (flags and FLEETSERVE_* environment variables) and model settings.

Model settings read MLServer's `model-settings.json` as it is: known fields are typed, every
other field is kept in `unknown` so nothing a user wrote is silently dropped.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import orjson

from fleetserve.codecs.numpy import array_from_json
from fleetserve.errors import InvalidInput, ModelLoadError
from fleetserve.types import DATATYPES, InferenceRequest, Tensor

MIB = 1024 * 1024


@dataclass
class ServerSettings:
    model_repository: str | None = None
    host: str = "127.0.0.1"
    http_port: int = 8080
    grpc_port: int = 8081
    metrics_port: int = 8082
    # Largest REST body or gRPC message accepted and sent.
    max_message_size: int = 256 * MIB
    # Threads that run framework calls off the event loop; one model may hold at most half.
    # Most wait on the GIL or I/O, so there are more of them than cores.
    inference_threads: int = 8
    # A model whose predict has taken less than this many microseconds of CPU (and little more
    # wall time) on the worker threads runs on the event loop instead, saving the thread hop;
    # one slower call sends it back to the threads. 0: always on the threads.
    inline_predict_us: float = 200.0
    # Seconds SIGTERM waits for in-flight requests before the server exits.
    shutdown_grace: float = 30.0
    log_level: str = "info"
    # "text" or "json" (one orjson document a line: server/logs.py); the access log, one line a
    # request (off: nothing runs for it).
    log_format: str = "text"
    access_log: bool = False
    # Memory for resident models, bytes or a Kubernetes quantity (512Mi, 4Gi); empty means
    # 70% of the container's limit or the machine's memory, leaving room for requests.
    memory_limit: str = ""
    # Registered models may total memory_limit * (1 + overcommit_percent / 100); the excess is evicted.
    overcommit_percent: float = 10.0
    # Where remote artifacts are downloaded; kept across restarts.
    cache_dir: str = os.path.join(tempfile.gettempdir(), "fleetserve-cache")
    # Where applied manifests are kept, so a restarted server applies them again; empty: nowhere.
    state_dir: str = ""
    # The fleet (fleet/membership.py): etcd's client URLs (http://HOST:2379, comma-separated; empty:
    # one process, no fleet), the fleet's name (it prefixes the etcd keys), the address peers use
    # (default --host, or this host's address when binding all addresses) and this replica's id
    # (default the host name: stable for a StatefulSet pod).
    etcd: str = ""
    fleet: str = "default"
    advertise_host: str = ""
    replica_id: str = ""
    # Comma-separated: `capabilities` replaces the default list, `extra_capabilities` adds to it.
    capabilities: str = ""
    extra_capabilities: str = ""
    # Seconds a load waits for a busy model to finish so it can be evicted, before answering 503.
    eviction_wait: float = 30.0
    # A Triton server (explicit model control) that serves the GPU models: its gRPC address, and
    # a model repository folder both servers see (else a model's files travel inside Triton's
    # load request).
    triton_url: str = ""
    triton_repository: str = ""
    # Memory for the models resident in Triton (bytes or a quantity); empty: no limit, Triton's
    # own. Past it, the least recently used idle GPU model is unloaded from Triton.
    gpu_memory_limit: str = ""
    # Bearer tokens (server/security.py): the admin token opens the routes that change or reveal
    # the repository, the data token inference (the admin token opens inference too). Empty: that
    # door is open. A *_file (a mounted Kubernetes secret) is read once at start.
    admin_token: str = field(default="", repr=False)
    admin_token_file: str = ""
    data_token: str = field(default="", repr=False)
    data_token_file: str = ""
    # TLS on the REST, gRPC and metrics ports (PEM files); a client CA also requires client
    # certificates signed by it (mTLS).
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # Safe code loading (README, "Code and storage"). A custom runtime's own code that came with
    # downloaded artifacts (s3://, gs://, http(s)://) is imported only when this is set.
    allow_remote_code: bool = False
    # Comma-separated prefixes that every storageUri / uri must start with (the model repository
    # is then allowed too); empty: any. /dev, /proc and /sys are refused whatever this says.
    allowed_storage: str = ""
    # Seconds one model's download may take in all; a connection or read that waits for bytes
    # gives up sooner (30 s, or this if less).
    download_timeout: float = 1800.0
    # Largest download of one model (and the most an archive may unpack to): bytes or a quantity.
    max_download_size: str = "10Gi"
    # Requests in flight at once, REST and gRPC together (inference and control; never health,
    # metadata, statistics or /metrics); past it, 503 with Retry-After or RESOURCE_EXHAUSTED at
    # once. 0: no limit. See _default_max_concurrent_requests.
    max_concurrent_requests: int = field(default_factory=lambda: _default_max_concurrent_requests())
    # Seconds a client may take to send a request's head (from its first byte, or from connecting),
    # then its body (from the end of the head), before its connection is closed. 0: no limit.
    request_head_timeout: float = 10.0
    request_body_timeout: float = 60.0
    # Whether the repository's models load at start (MLServer's load_models_at_startup); if not,
    # they load through the repository API. A model named by MLSERVER_MODEL_* loads either way.
    load_models_at_startup: bool = True
    # Worker processes for a custom runtime whose model-settings.json does not say (MLServer's
    # parallel_workers; 0: in the server process). Built-in runtimes run on threads.
    parallel_workers: int = 1

    @property
    def memory_limit_bytes(self) -> int:
        if self.memory_limit:
            return _flag_quantity(self.memory_limit, "--memory-limit")
        return int(0.7 * _available_memory())

    @property
    def gpu_memory_limit_bytes(self) -> int | None:
        if not self.gpu_memory_limit:
            return None
        return _flag_quantity(self.gpu_memory_limit, "--gpu-memory-limit")

    @property
    def admin_secret(self) -> str:
        return read_secret(self.admin_token, self.admin_token_file, "admin-token")

    @property
    def data_secret(self) -> str:
        return read_secret(self.data_token, self.data_token_file, "data-token")

    @property
    def max_download_bytes(self) -> int:
        return _flag_quantity(self.max_download_size, "--max-download-size")

    @property
    def allowed_storage_prefixes(self) -> list[str]:
        """The --allowed-storage prefixes, plus the model repository when there are any."""
        prefixes = _split(self.allowed_storage)
        if prefixes and self.model_repository:
            prefixes.append(str(Path(self.model_repository).resolve()))
        return prefixes

    @property
    def capability_list(self) -> list[str]:
        chosen = _split(self.capabilities) or list(DEFAULT_CAPABILITIES)
        extra = _split(self.extra_capabilities) + (list(TRITON_CAPABILITIES) if self.triton_url else [])
        return chosen + [item for item in dict.fromkeys(extra) if item not in chosen]

    @classmethod
    def from_env(cls, **overrides: Any) -> "ServerSettings":
        """Defaults, then MLServer's settings (the repository's settings.json, then MLSERVER_*
        variables), then FLEETSERVE_<FIELD> variables, then explicit (non-None) overrides."""
        given = {key: value for key, value in overrides.items() if value is not None}
        values = _mlserver_settings(given.get("model_repository") or os.environ.get("FLEETSERVE_MODEL_REPOSITORY"))
        defaults = cls()
        for spec in fields(cls):
            raw = os.environ.get(f"FLEETSERVE_{spec.name.upper()}")
            if raw is not None:
                values[spec.name] = _convert(f"FLEETSERVE_{spec.name.upper()}", raw, type(getattr(defaults, spec.name)))
        values.update(given)
        return cls(**values)


# MLServer's server settings that mean the same here: settings.json's key (and MLSERVER_<KEY>) -> field.
MLSERVER_SETTINGS = {"host": "host", "http_port": "http_port", "grpc_port": "grpc_port", "metrics_port": "metrics_port",
                     "grpc_max_message_length": "max_message_size", "load_models_at_startup": "load_models_at_startup",
                     "parallel_workers": "parallel_workers", "models_dir": "model_repository"}


def _mlserver_settings(repository: str | None) -> dict[str, Any]:
    """What MLServer's settings say, as ServerSettings fields: settings.json in the repository
    folder (MLSERVER_MODELS_DIR when no other names it), then the MLSERVER_* variables."""
    values: dict[str, Any] = {}
    repository = repository or os.environ.get("MLSERVER_MODELS_DIR")
    settings_file = Path(repository) / "settings.json" if repository else None
    if settings_file is not None and settings_file.is_file():
        try:
            document = orjson.loads(settings_file.read_bytes())
        except (OSError, orjson.JSONDecodeError) as error:
            raise SystemExit(f"{settings_file}: {error}") from None
        if not isinstance(document, dict):
            raise SystemExit(f"{settings_file}: MLServer's settings are a JSON object")
        for key, field_name in MLSERVER_SETTINGS.items():
            if document.get(key) is not None and key != "models_dir":
                values[field_name] = _convert(f"{settings_file}: {key}", str(document[key]).lower()
                                              if isinstance(document[key], bool) else str(document[key]),
                                              type(getattr(ServerSettings, field_name)))
    for key, field_name in MLSERVER_SETTINGS.items():
        raw = os.environ.get(f"MLSERVER_{key.upper()}")
        if raw is not None:
            values[field_name] = _convert(f"MLSERVER_{key.upper()}", raw, type(getattr(ServerSettings, field_name)))
    return values


def mlserver_model() -> dict[str, Any] | None:
    """The one model MLServer's MLSERVER_MODEL_* variables describe (how KServe's kserve-mlserver
    runtime names the model it serves), as model-settings.json would; None when they name none."""
    name, uri = os.environ.get("MLSERVER_MODEL_NAME"), os.environ.get("MLSERVER_MODEL_URI")
    if not name and not uri:
        return None
    parameters = {"uri": uri} if uri else {}
    if version := os.environ.get("MLSERVER_MODEL_VERSION"):
        parameters["version"] = version
    raw: dict[str, Any] = {"name": name or Path(uri or "model").name, "parameters": parameters}
    if implementation := os.environ.get("MLSERVER_MODEL_IMPLEMENTATION"):
        raw["implementation"] = implementation
    return raw


# What a server offers, as Seldon Core 2 `requirements` name it ("mlserver": Seldon's manifests
# ask for it beside a framework, e.g. [mlserver, alibi-detect]).
DEFAULT_CAPABILITIES = (
    "mlserver", "sklearn", "xgboost", "lightgbm", "mlflow", "onnx", "huggingface", "alibi-explain", "alibi-detect",
    "python",
)
# What a model may require when a Triton backend is configured (--triton-url); any of them sends it there.
TRITON_CAPABILITIES = ("triton", "tensorrt", "onnx-gpu", "pytorch", "tensorflow", "openvino", "python-backend")
TRITON_RUNTIME = "fleetserve.runtimes.triton.TritonRuntime"

_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?(?:[eE][0-9]+)?)\s*([KMGTPE]i?|k)?\s*$")
_UNITS = {None: 1, "k": 1000, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4, "P": 1000**5, "E": 1000**6,
          "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "Pi": 1024**5, "Ei": 1024**6}


def parse_quantity(value: Any) -> int:
    """Bytes from an integer or a Kubernetes quantity: 1000, 64Mi, 1.5Gi, 2G."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _QUANTITY.match(str(value)) if isinstance(value, (str, float)) else None
    if match is None:
        raise ValueError(f"{value!r} is not a memory quantity (bytes, or a number with Ki, Mi, Gi, k, M, G ...)")
    size = float(match.group(1)) * _UNITS[match.group(2)]
    if not size < 2**63:
        raise ValueError(f"{value!r} is too large a memory quantity")
    return int(size)


def read_secret(value: str, path: str, flag: str) -> str:
    """A token given as `--FLAG` or as `--FLAG-file` (read now, stripped); empty when neither is."""
    variable = "FLEETSERVE_" + flag.replace("-", "_").upper()
    direct, from_file = f"--{flag} ({variable})", f"--{flag}-file ({variable}_FILE)"
    if value and path:
        raise SystemExit(f"{direct} and {from_file} are both set; give one")
    if path:
        try:
            value = Path(path).read_text().strip()
        except (OSError, UnicodeDecodeError) as error:
            raise SystemExit(f"{from_file}: cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
        if not value:
            raise SystemExit(f"{from_file}: {path} is empty")
    # It travels in an HTTP header and in gRPC metadata.
    if value and not all("!" <= character <= "~" for character in value):
        raise SystemExit(f"{from_file if path else direct}: a token must be printable ASCII without spaces")
    return value


def _flag_quantity(value: str, flag: str) -> int:
    """A server flag's quantity in bytes; one that is none stops the start, naming the flag."""
    try:
        return parse_quantity(value)
    except ValueError as error:
        raise SystemExit(f"{flag}: {error}") from None


def _available_memory() -> int:
    """The container's memory limit (cgroup v2 or v1) if it has one, else the machine's memory."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(path).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or a huge number means no limit
            return int(limit)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def is_within(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether `path` is `root` or lies under it, once both are resolved (symlinks and '..' followed)."""
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
def _default_max_concurrent_requests() -> int:
    """64 per core, at least 256. Past what the worker threads run, requests only queue: at a
    thousand or more small requests per second per core, 64 queued per core is tens of
    milliseconds of waiting, room for every connection a load balancer or a benchmark keeps
    busy; a flood past it is refused in microseconds instead of queueing for seconds while
    holding its tensors."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(256, 64 * cores)


def _split(items: str) -> list[str]:
    return [item.strip() for item in items.split(",") if item.strip()]


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _convert(where: str, raw: str, kind: type) -> Any:
    if kind is bool:
        if raw.strip().lower() not in _TRUE + _FALSE:
            raise SystemExit(f"{where} must be true or false (1, yes, on / 0, no, off), got {raw!r}")
        return raw.strip().lower() in _TRUE
    if kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            raise SystemExit(f"{where} must be a number, got {raw!r}") from None
    return raw


_VALID_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def is_model_name(name: Any) -> bool:
    return isinstance(name, str) and bool(_VALID_NAME.match(name)) and ".." not in name


def check_model_name(name: Any, what: str = "model name") -> str:
    """`name`, a model's or a version's: it names folders and URL paths."""
    if not is_model_name(name):
        raise InvalidInput(
            f"invalid {what} {name!r}: use letters, digits, '.', '_' and '-', no path separators or '..'"
        )
    return name


@dataclass
class TensorMetadata:
    name: str
    datatype: str
    shape: list[int] | None  # None: not declared, so not checked
    parameters: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: Any, where: str) -> "TensorMetadata":
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise ModelLoadError(f"{where}: each tensor needs at least a 'name', got {raw!r}")
        where = f"{where}: tensor '{raw['name']}'"
        parameters = raw.get("parameters")
        parameters = {} if parameters is None else parameters
        if not isinstance(parameters, dict):
            raise ModelLoadError(f"{where}: 'parameters' must be an object")
        datatype = raw.get("datatype", "BYTES" if parameters.get("content_type") == "str" else "FP32")
        if datatype not in DATATYPES:
            raise ModelLoadError(f"{where}: unknown datatype {datatype!r}; expected one of {sorted(DATATYPES)}")
        shape = raw.get("shape")
        if shape is not None and not (
            isinstance(shape, list) and all(type(dim) is int and dim >= -1 for dim in shape)
        ):
            raise ModelLoadError(f"{where}: shape must be a list of integers (-1 for any size), got {shape!r}")
        return cls(name=raw["name"], datatype=datatype, shape=shape, parameters=parameters)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "datatype": self.datatype, "shape": self.shape or [-1]}
        if self.parameters:
            out["parameters"] = self.parameters
        return out


def _count(raw: dict, key: str) -> int:
    """A non-negative integer setting; absent or null is 0."""
    value = raw.get(key)
    if value is None:
        return 0
    if type(value) is not int or value < 0:
        raise ValueError(f"{key} must be a non-negative integer, got {value!r}")
    return value


def _warmup_samples(samples: Any, where: str) -> list[InferenceRequest]:
    """`warmup`: V2 request bodies (JSON `inputs`), each with an optional `count` (default 1)."""
    if samples is None:
        return []
    if not isinstance(samples, list):
        raise ModelLoadError(f"{where}: 'warmup' must be a list of V2 requests ({{\"inputs\": [...]}})")
    requests = []
    for number, sample in enumerate(samples, 1):
        here = f"{where}: warmup sample {number}"
        sample = sample if isinstance(sample, dict) else {}
        inputs, count, parameters = sample.get("inputs"), sample.get("count", 1), sample.get("parameters") or {}
        if not isinstance(inputs, list) or not inputs or not all(
                isinstance(tensor, dict) and isinstance(tensor.get("name"), str) for tensor in inputs):
            raise ModelLoadError(f"{here}: needs 'inputs', a list of tensors (name, datatype, shape, data)")
        if type(count) is not int or not 1 <= count <= 1000:
            raise ModelLoadError(f"{here}: 'count' must be an integer from 1 to 1000")
        if not isinstance(parameters, dict):
            raise ModelLoadError(f"{here}: 'parameters' must be an object")
        try:
            tensors = [Tensor(tensor.get("name"), array_from_json(tensor.get("data"), tensor.get("datatype"),
                                                                  tensor.get("shape"), tensor.get("name")))
                       for tensor in inputs]
        except InvalidInput as error:
            raise ModelLoadError(f"{here}: {error.message}") from None
        # A request each time: a model may change what it was given.
        requests += [InferenceRequest(inputs=list(tensors), parameters=dict(parameters)) for _ in range(count)]
    return requests


def _tensor_list(raw: dict, key: str, where: str) -> list[TensorMetadata]:
    tensors = raw.get(key)
    if tensors is None:
        return []
    if not isinstance(tensors, list):
        raise ModelLoadError(f"{where}: '{key}' must be a list of tensors")
    return [TensorMetadata.parse(item, where) for item in tensors]


@dataclass
class ModelSettings:
    """One model version, as described by `model-settings.json` (or defaults)."""

    name: str
    folder: Path
    implementation: str | None = None
    uri: str | None = None
    version: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    content_type: str | None = None
    inputs: list[TensorMetadata] = field(default_factory=list)
    outputs: list[TensorMetadata] = field(default_factory=list)
    platform: str = ""
    max_batch_size: int = 0
    max_batch_time: float = 0.0
    # Processes of its own that run predict; 0: the server's threads; None (not written): one for a
    # custom runtime, so a crash in user code fails only its own requests, else 0.
    parallel_workers: int | None = None
    requirements: list[str] = field(default_factory=list)
    memory: int = 0  # declared bytes; 0 when not declared
    # Triton's queue policy: requests that may wait for a predict slot (0: no limit), and how
    # long a request may take before it is answered 504 (0: no limit; a request's own shorter
    # `timeout` parameter wins).
    max_queue_size: int = 0
    default_timeout_microseconds: int = 0
    unknown: dict[str, Any] = field(default_factory=dict)
    fetched: Path | None = None  # the local copy of a remote `uri`, once downloaded
    # Requests the model answers after every load, a reload after eviction included, before it
    # takes traffic (Triton's model_warmup): `warmup` in model-settings.json, V2 request bodies.
    warmup: list[InferenceRequest] = field(default_factory=list)
    from_manifest: bool = False  # its artifacts may hold a model-settings.json to complete it

    _KNOWN = {"name", "implementation", "parameters", "inputs", "outputs", "platform", "max_batch_size",
              "max_batch_time", "parallel_workers", "requirements", "versions", "memory", "max_queue_size",
              "default_timeout_microseconds", "warmup"}
    _KNOWN_PARAMETERS = {"uri", "version", "extra", "content_type"}

    @classmethod
    def parse(cls, raw: Any, folder: Path, default_name: str, default_version: str | None = None) -> "ModelSettings":
        where = str(folder)
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{where}: model settings must be a JSON object")
        parameters = raw.get("parameters")
        parameters = {} if parameters is None else parameters
        if not isinstance(parameters, dict):
            raise ModelLoadError(f"{where}: 'parameters' must be an object")
        extra = parameters.get("extra")
        extra = {} if extra is None else extra
        if not isinstance(extra, dict):
            raise ModelLoadError(f"{where}: 'parameters.extra' must be an object")
        requirements = raw.get("requirements")
        requirements = [] if requirements is None else requirements
        if not isinstance(requirements, list) or not all(isinstance(item, str) for item in requirements):
            raise ModelLoadError(f"{where}: 'requirements' must be a list of strings")
        try:
            name = check_model_name(raw.get("name") or default_name)
            max_batch_size = int(raw.get("max_batch_size") or 0)
            max_batch_time = float(raw.get("max_batch_time") or 0)
            parallel_workers = raw.get("parallel_workers")
            parallel_workers = None if parallel_workers is None else int(parallel_workers)
            if max_batch_size < 0 or max_batch_time < 0 or (parallel_workers or 0) < 0:
                raise ValueError("max_batch_size, max_batch_time and parallel_workers must not be negative")
            max_queue_size = _count(raw, "max_queue_size")
            default_timeout_microseconds = _count(raw, "default_timeout_microseconds")
            memory = parse_quantity(raw.get("memory") or 0)
            version = parameters.get("version", default_version)
            version = None if version is None else check_model_name(str(version), "version")
        except (InvalidInput, TypeError, ValueError) as error:
            raise ModelLoadError(f"{where}: {error}") from None
        unknown = {key: value for key, value in raw.items() if key not in cls._KNOWN}
        unknown_parameters = {k: v for k, v in parameters.items() if k not in cls._KNOWN_PARAMETERS}
        if unknown_parameters:
            unknown["parameters"] = unknown_parameters
        return cls(
            name=name,
            folder=folder,
            implementation=raw.get("implementation"),
            uri=parameters.get("uri"),
            version=version,
            extra=extra,
            content_type=parameters.get("content_type"),
            inputs=_tensor_list(raw, "inputs", where),
            outputs=_tensor_list(raw, "outputs", where),
            platform=raw.get("platform") or "",
            max_batch_size=max_batch_size,
            max_batch_time=max_batch_time,
            parallel_workers=parallel_workers,
            requirements=requirements,
            memory=memory,
            max_queue_size=max_queue_size,
            default_timeout_microseconds=default_timeout_microseconds,
            warmup=_warmup_samples(raw.get("warmup"), where),
            unknown=unknown,
        )

    @classmethod
    def from_file(cls, path: Path, default_name: str, default_version: str | None = None) -> "ModelSettings":
        try:
            raw = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError as error:
            raise ModelLoadError(f"{path}: not valid JSON: {error}") from None
        return cls.parse(raw, path.parent, default_name, default_version)

    def complete_from_artifacts(self) -> None:
        """A Model manifest names the artifacts; a model-settings.json among them says how to serve
        them. The manifest's name, requirements, memory and parameters win."""
        folder = self.artifact_path
        if not folder.is_dir():
            return
        self.folder = self.fetched = folder  # a custom model's code is found there too
        if not (folder / "model-settings.json").is_file():
            return
        inner = ModelSettings.from_file(folder / "model-settings.json", self.name)
        self.implementation = self.implementation or inner.implementation
        self.extra = {**inner.extra, **self.extra}
        self.requirements = self.requirements or inner.requirements
        self.memory = self.memory or inner.memory
        self.version = self.version or inner.version
        self.content_type = self.content_type or inner.content_type
        self.inputs, self.outputs, self.platform = inner.inputs, inner.outputs, inner.platform
        self.max_batch_size, self.max_batch_time = inner.max_batch_size, inner.max_batch_time
        if self.parallel_workers is None:
            self.parallel_workers = inner.parallel_workers
        self.max_queue_size = self.max_queue_size or inner.max_queue_size
        self.default_timeout_microseconds = self.default_timeout_microseconds or inner.default_timeout_microseconds
        self.warmup = self.warmup or inner.warmup
        if inner.uri:
            # The storage the manifest names is what was checked: its own settings may not reach past it.
            if not is_within(inner.artifact_path, folder):
                raise ModelLoadError(
                    f"model '{self.name}': the uri {inner.uri!r} in the model-settings.json of its artifacts "
                    "points outside them"
                )
            self.fetched = inner.artifact_path

    @property
    def chosen_implementation(self) -> str | None:
        """`implementation`, else "triton" when a requirement is one only Triton provides."""
        if self.implementation:
            return self.implementation
        return "triton" if any(item in TRITON_CAPABILITIES for item in self.requirements) else None

    @property
    def runtime_key(self) -> str:
        """Which runtime serves the model, as far as its settings tell before it loads."""
        return self.chosen_implementation or ",".join(self.requirements)

    @property
    def device(self) -> str:
        """Whose memory the model takes: "gpu" for models served by Triton, else "cpu" (this process)."""
        return "gpu" if self.chosen_implementation in ("triton", TRITON_RUNTIME) else "cpu"

    @property
    def artifact_path(self) -> Path:
        """Where the model's files are: the downloaded copy of a remote `uri`, a local `uri`
        relative to the folder, else the folder."""
        if self.fetched is not None:
            return self.fetched
        if not self.uri:
            return self.folder
        uri = self.uri.removeprefix("file://")
        path = Path(uri)
        return path if path.is_absolute() else self.folder / path
