"""Alibi Detect detectors: drift and outlier detectors served as models.

The artifact is a folder written by alibi-detect's `save_detector` (config.toml, or the legacy
meta.dill layout), or one pickled detector (.joblib, .pkl, .dill) for the detectors whose saver
needs TensorFlow (IForest, Mahalanobis). Numpy and PyTorch backends need no TensorFlow.

`parameters.extra`, as MLServer's alibi-detect runtime reads it:
- `predict_parameters`: keyword arguments to the detector's `predict()` (`return_p_val`,
  `drift_type`, `return_instance_score`, ...).
- `batch_size`: rows gathered across requests before a drift check runs; a request that does
  not complete a batch is answered with no outputs. A pipeline step's `batch.size` does the same
  without delaying the pipeline's answer.

The answer has one output per entry of the detector's data (`is_drift`, `distance`, `p_val`,
`threshold`; `is_outlier`, `instance_score`, `feature_score`), those the detector left empty
omitted, a single number as shape [1]; the detector's `meta` goes in the response parameters.
A drift detector's latest result is the gauge `fleetserve_drift_detected{model}`.
"""

from __future__ import annotations

import threading

import numpy as np

from fleetserve import codecs
from fleetserve.errors import InferenceError, InvalidInput, ModelLoadError
from fleetserve.runtime.base import Runtime
from fleetserve.runtime.metrics import DRIFT_RESULTS
from fleetserve.types import InferenceRequest, InferenceResponse

SAVED_DETECTOR_FILES = ("config.toml", "meta.dill")
PICKLED_DETECTOR_NAMES = ("detector.joblib", "model.joblib", "detector.pkl", "model.pkl", "detector.dill")
PICKLED_DETECTOR_SUFFIXES = (".joblib", ".pkl", ".dill")


class AlibiDetectRuntime(Runtime):
    def load(self) -> None:
        extra = self.settings.extra
        self.predict_parameters = extra.get("predict_parameters") or {}
        if not isinstance(self.predict_parameters, dict):
            raise ModelLoadError(f"detector '{self.name}': predict_parameters must be an object")
        self.batch_size = extra.get("batch_size")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ModelLoadError(f"detector '{self.name}': batch_size must be a positive number of rows")
        self.detector = self._load_detector()
        meta = getattr(self.detector, "meta", None)
        if not (callable(getattr(self.detector, "predict", None)) and isinstance(meta, dict)):
            raise ModelLoadError(f"detector '{self.name}': {type(self.detector).__name__} is not an alibi-detect detector")
        self.meta = {key: value for key, value in meta.items() if value is not None}
        self.is_drift_detector = meta.get("detector_type") == "drift"
        self._waiting: list[np.ndarray] = []
        self._lock = threading.Lock()  # requests run on worker threads; the batch and a stateful detector are shared

    def _load_detector(self):
        saving = _import_alibi_detect(self.name)
        path = self.settings.artifact_path
        try:
            if path.is_dir() and any((path / name).is_file() for name in SAVED_DETECTOR_FILES):
                return saving.load_detector(str(path))
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
        if data.dtype.kind == "O":
            raise InvalidInput(f"detector '{self.name}' checks numbers: send a numeric tensor, not BYTES")
        reference = getattr(self.detector, "x_ref", None)  # a drift detector's reference rows
        if isinstance(reference, np.ndarray) and data.shape[1:] != reference.shape[1:]:
            raise InvalidInput(f"detector '{self.name}' compares rows of shape {list(reference.shape[1:])}, "
                               f"got {list(data.shape[1:])}")
        with self._lock:
            if self.batch_size:
                if self._waiting and data.shape[1:] != self._waiting[0].shape[1:]:
                    raise InvalidInput(f"detector '{self.name}': rows of shape {list(data.shape[1:])} cannot join "
                                       f"the batch's {list(self._waiting[0].shape[1:])}")
                self._waiting.append(data)
                if sum(len(rows) for rows in self._waiting) < self.batch_size:
                    return self.response([], request)
                data, self._waiting = np.concatenate(self._waiting), []
            result = self._run(data)
        outputs = [codecs.encode_tensor(name, np.atleast_1d(np.asarray(value)))
                   for name, value in result["data"].items() if value is not None]
        response = self.response(outputs, request)
        response.parameters = dict(self.meta)
        return response

    def _run(self, data: np.ndarray) -> dict:
        try:
            result = self.detector.predict(data, **self.predict_parameters)
        except TypeError as error:
            raise InvalidInput(f"detector '{self.name}': predict_parameters: {error}") from None
        except ValueError as error:  # shapes or types the detector's reference data does not match
            raise InvalidInput(f"detector '{self.name}': {error}") from None
        except Exception as error:
            raise InferenceError(f"detector '{self.name}' failed: {type(error).__name__}: {error}") from None
        if self.is_drift_detector and "is_drift" in result["data"]:
            DRIFT_RESULTS.record(self.name, bool(np.asarray(result["data"]["is_drift"]).any()))
        return result


def _import_alibi_detect(name: str):
    try:
        import alibi_detect.saving
    except ImportError as error:
        raise ModelLoadError(f"detector '{name}' needs alibi-detect ({error}): pip install 'fleetserve[alibi-detect]'") from None
    return alibi_detect.saving
