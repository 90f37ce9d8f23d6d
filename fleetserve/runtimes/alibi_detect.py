"""Alibi Detect detectors: drift and outlier detectors served as models.

The artifact is a folder written by alibi-detect's `save_detector` (config.toml, or the legacy
meta.dill layout), or one pickled detector (.joblib, .pkl, .dill) for the detectors whose saver
needs TensorFlow (IForest, Mahalanobis). Numpy and PyTorch backends need no TensorFlow.

`parameters.extra`, as MLServer's alibi-detect runtime reads it:
- `predict_parameters`: keyword arguments to the detector's `predict()` (`return_p_val`,
  `drift_type`, `return_instance_score`, ...).
- `batch_size`: requests gathered before a drift check runs on all their rows; a request that
  does not complete a batch is answered with no outputs. A pipeline step's `batch.size` does the
  same without a client seeing it.

The answer has one output per entry of the detector's data (`is_drift`, `distance`, `p_val`,
`threshold`; `is_outlier`, `instance_score`, `feature_score`), those the detector returns as
None omitted, a single number as shape [1]; the detector's `meta` goes in the response
parameters. An online detector (meta `online`) takes the rows one at a time, as time steps, and
answers one value per row. Its state (time step, windows), like the requests gathered for
`batch_size`, carries over to the detector's next load in this server process: after an unload
or an eviction, and in a reload, which loads the new detector while the old one still serves.
A drift detector's latest result is `fleetserve_drift_detected{model}`.
"""

from __future__ import annotations

import atexit
import inspect
import logging
import shutil
import tempfile
import threading
import weakref
from pathlib import Path

import numpy as np

from fleetserve import codecs
from fleetserve.errors import FleetError, InferenceError, InvalidInput, ModelLoadError
from fleetserve.runtime.base import Runtime
from fleetserve.runtime.metrics import DRIFT_RESULTS
from fleetserve.types import InferenceRequest, InferenceResponse

# Imported with this module, when the first detector's runtime is resolved: apart from its load,
# whose memory is measured, since the import takes seconds and hundreds of MiB (torch).
try:
    from alibi_detect.saving import load_detector
except ImportError as error:
    load_detector, MISSING = None, error

SAVED_DETECTOR_FILES = ("config.toml", "meta.dill")
PICKLED_DETECTOR_NAMES = ("detector.joblib", "model.joblib", "detector.pkl", "model.pkl", "detector.dill")
PICKLED_DETECTOR_SUFFIXES = (".joblib", ".pkl", ".dill")

log = logging.getLogger(__name__)

# Where online detectors' states wait between loads, for this server process's life.
STATE_ROOT = Path(tempfile.mkdtemp(prefix="fleetserve-detector-state-"))
atexit.register(shutil.rmtree, STATE_ROOT, True)
_WAITING: dict[tuple[str, str | None], list[np.ndarray]] = {}
# The detector serving each (name, version). A reload loads the new one before the old one unloads;
# weak, so that a load the memory manager drops (its warm-up) leaves no entry behind.
_SERVING: weakref.WeakValueDictionary[tuple[str, str | None], "AlibiDetectRuntime"] = weakref.WeakValueDictionary()


class AlibiDetectRuntime(Runtime):
    steady_cost = False  # most batch_size requests only append; the one completing a batch checks it

    def load(self) -> None:
        extra = self.settings.extra
        self.batch_size = extra.get("batch_size")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ModelLoadError(f"detector '{self.name}': batch_size must be a positive number of requests")
        self.detector = self._load_detector()
        meta = getattr(self.detector, "meta", None)
        if not (callable(getattr(self.detector, "predict", None)) and isinstance(meta, dict)):
            raise ModelLoadError(f"detector '{self.name}': {type(self.detector).__name__} is not an alibi-detect detector")
        self.predict_parameters = extra.get("predict_parameters") or {}
        try:  # the operator's settings: wrong ones fail the load, not every request
            inspect.signature(self.detector.predict).bind(None, **self.predict_parameters)
        except TypeError as error:
            raise ModelLoadError(f"detector '{self.name}': predict_parameters: {error}") from None
        self.meta = {key: value for key, value in meta.items() if value is not None}
        self.is_drift_detector = meta.get("detector_type") == "drift"
        self.online = bool(meta.get("online"))  # predict() takes one instance at a time
        self.row_shape = _reference_row_shape(self.detector)
        self._waiting: list[np.ndarray] = []
        self._lock = threading.Lock()  # requests run on worker threads; the batch and a stateful detector are shared
        predecessor = _SERVING.get(self._key)
        if predecessor is None:
            # What the last unload (an eviction, say) kept: the requests gathered for batch_size, an
            # online detector's state.
            self._take_waiting(_WAITING.get(self._key, []))
            if self.online:
                self._restore_state(_state_folder(self.name, self.version))
        elif self.online and predecessor.online:
            # A reload while the old detector serves: this one goes on from the old one's state now
            # (the old one hands over the requests it has gathered at its unload).
            with tempfile.TemporaryDirectory(dir=STATE_ROOT) as folder:
                with predecessor._lock:
                    predecessor._keep_state(Path(folder))
                self._restore_state(Path(folder))
        _SERVING[self._key] = self

    @property
    def _key(self) -> tuple[str, str | None]:
        return self.name, self.version

    def _take_waiting(self, gathered: list[np.ndarray]) -> None:
        with self._lock:
            self._waiting += [rows for rows in gathered if self.row_shape is None or rows.shape[1:] == self.row_shape]

    def unload(self) -> None:
        with self._lock:
            successor = _SERVING.get(self._key)
            if successor is not self:  # a reload replaced this detector while it served
                if successor is not None:
                    successor._take_waiting(self._waiting)
                return
            del _SERVING[self._key]
            _WAITING[self._key] = self._waiting
            if self.online:
                self._keep_state(_state_folder(self.name, self.version))

    def _keep_state(self, folder: Path) -> None:
        try:
            self.detector.save_state(str(folder))
        except Exception:
            log.exception("detector %s: its online state could not be kept", self.name)

    def _restore_state(self, folder: Path) -> None:
        """An online detector goes on from where another left it (its last unload, say)."""
        if not folder.is_dir():
            return
        try:
            self.detector.load_state(str(folder))
        except Exception as error:  # a different detector under the same name: start afresh
            log.warning("detector %s: starting afresh, its kept state does not fit (%s: %s)",
                        self.name, type(error).__name__, error)
            self.detector.reset_state()

    def _load_detector(self):
        if load_detector is None:
            raise ModelLoadError(f"detector '{self.name}' needs alibi-detect ({MISSING}): "
                                 "pip install 'fleetserve[alibi-detect]'")
        path = self.settings.artifact_path
        try:
            if path.is_dir() and any((path / name).is_file() for name in SAVED_DETECTOR_FILES):
                return load_detector(str(path))
            import joblib

            return joblib.load(self.artifact(PICKLED_DETECTOR_NAMES, PICKLED_DETECTOR_SUFFIXES))
        except ModelLoadError:
            raise
        except Exception as error:  # alibi-detect's loaders raise whatever the saved files provoke
            raise ModelLoadError(f"detector '{self.name}': cannot load {path}: {type(error).__name__}: {error}") from None

    def predict(self, request: InferenceRequest) -> InferenceResponse:
        data = self.decode(request)
        if isinstance(data, dict):
            raise InvalidInput(f"detector '{self.name}' takes one input tensor, got {list(data)}")
        data = np.asarray(data)
        if data.dtype.kind not in "biuf":
            raise InvalidInput(f"detector '{self.name}' checks numbers: send a numeric tensor, not {data.dtype}")
        if data.ndim == 0 or len(data) == 0:
            raise InvalidInput(f"detector '{self.name}' checks rows: send at least one")
        if self.row_shape is not None and data.shape[1:] != self.row_shape:
            raise InvalidInput(f"detector '{self.name}' compares rows of shape {list(self.row_shape)}, "
                               f"got {list(data.shape[1:])}")
        with self._lock:
            gathered = 0
            if self.batch_size and not self.online:
                if self._waiting and data.shape[1:] != self._waiting[0].shape[1:]:
                    raise InvalidInput(f"detector '{self.name}': rows of shape {list(data.shape[1:])} cannot join "
                                       f"the batch's {list(self._waiting[0].shape[1:])}")
                self._waiting.append(data)
                if len(self._waiting) < self.batch_size:
                    return self.response([], request)
                gathered, data, self._waiting = len(self._waiting), np.concatenate(self._waiting), []
            try:
                results = [self._run(row) for row in data] if self.online else [self._run(data)]
            except FleetError:
                if gathered:  # the other requests were answered already: say where their rows went
                    log.warning("detector %s: a check of %d requests' rows failed; the rows are dropped", self.name, gathered)
                raise
        outputs = [codecs.encode_tensor(name, _joined([result[name] for result in results], self.online))
                   for name in results[-1] if all(result[name] is not None for result in results)]
        response = self.response(outputs, request)
        response.parameters = dict(self.meta)
        return response

    def _run(self, data: np.ndarray) -> dict[str, np.ndarray | None]:
        """The detector's data for `data`."""
        try:
            result = self.detector.predict(data, **self.predict_parameters)
        except (TypeError, ValueError, IndexError) as error:  # what alibi-detect raises for data it cannot compare
            raise InvalidInput(f"detector '{self.name}': {type(error).__name__}: {error}") from None
        except Exception as error:
            raise InferenceError(f"detector '{self.name}' failed: {type(error).__name__}: {error}") from None
        # Copies: an online detector's restored state holds its time step as an array it then
        # updates in place, which would change every earlier row's answer.
        data = {name: None if value is None else np.array(value) for name, value in result["data"].items()}
        if self.is_drift_detector and "is_drift" in data:
            DRIFT_RESULTS.record(self.name, bool(data["is_drift"].any()))
        return data


def _joined(values: list[np.ndarray], online: bool) -> np.ndarray:
    """One output: a batch detector's value as it is (a single number as shape [1]), an online
    detector's values one per row."""
    return np.stack(values) if online else np.atleast_1d(values[0])


def _state_folder(name: str, version: str | None) -> Path:
    return STATE_ROOT / name / (version or "default")


def _reference_row_shape(detector) -> tuple[int, ...] | None:
    """The shape of a row the detector compares, when its reference rows say so: not when they
    were preprocessed (an encoder's output is not what clients send)."""
    for holder in (detector, getattr(detector, "_detector", None)):  # backends wrap the detector
        if getattr(holder, "preprocess_fn", None) is not None:
            return None
        reference = getattr(holder, "x_ref", None)
        if isinstance(reference, np.ndarray):
            return reference.shape[1:]
    return None
