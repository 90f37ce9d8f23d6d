"""LightGBM Booster text files (`booster.save_model("model.txt")`): classifiers answer `predict`
(class indices) and `predict_proba`, regressors and rankers `predict`, as for sklearn and xgboost.
The metadata gives the booster's feature count and, for classifiers, its class count. Configured
with MLServer's class name, `predict` is the booster's own answer, as in MLServer."""

from __future__ import annotations

import lightgbm
import numpy as np

from fleetserve.errors import ModelLoadError
from fleetserve.runtime.base import MethodRuntime
from fleetserve.settings import TensorMetadata

MLSERVER_NAME = "mlserver_lightgbm.LightGBMModel"
# Objectives whose raw output is one probability (binary) or one per class (multiclass).
_BINARY = ("binary", "cross_entropy", "xentropy")
_MULTICLASS = ("multiclass", "softmax", "multiclassova", "multiclass_ova", "ova", "ovr")


class LightGBMRuntime(MethodRuntime):

    def load(self) -> None:
        path = self.artifact(("model.txt", "model.bst"), (".txt", ".bst"))
        try:
            booster = lightgbm.Booster(model_file=str(path))
        except lightgbm.basic.LightGBMError as error:
            raise ModelLoadError(f"model '{self.name}': {path.name} is not a LightGBM model: {error}") from None
        objective = _objective(path)
        if objective in _BINARY:
            self.model, self.classes = _BinaryClassifier(booster), 2
        elif objective in _MULTICLASS:
            self.model, self.classes = _MulticlassClassifier(booster), booster.num_model_per_iteration()
        else:
            self.model, self.classes = booster, 0
        self.methods = ("predict", "predict_proba") if self.classes else ("predict",)
        # MLServer's LightGBMModel answers booster.predict() itself as `predict` (probabilities
        # for a classifier): a model configured with its name keeps MLServer's answers.
        self.raw_predict = self.settings.implementation == MLSERVER_NAME and self.classes > 0
        if self.raw_predict:
            self.model = _RawPredict(self.model, booster)
        self.check_methods()
        self.own_inputs = [TensorMetadata(name="input-0", datatype="FP64", shape=[-1, booster.num_feature()])]
        self.own_outputs = self._outputs()

    def _outputs(self) -> list[TensorMetadata]:
        if not self.classes:
            return [TensorMetadata(name="predict", datatype="FP64", shape=[-1])]
        probabilities = TensorMetadata(name="predict_proba", datatype="FP64", shape=[-1, self.classes])
        if self.raw_predict:
            raw_shape = [-1] if self.classes == 2 else [-1, self.classes]
            return [TensorMetadata(name="predict", datatype="FP64", shape=raw_shape), probabilities]
        return [TensorMetadata(name="predict", datatype="INT64", shape=[-1]), probabilities]


def _objective(path) -> str:
    """The objective's name from the model file's header (`objective=binary sigmoid:1`), read
    without dumping the model, which takes long for large ones."""
    with open(path, encoding="utf-8", errors="replace") as file:
        for line in file:
            if line.startswith("objective="):
                words = line[len("objective="):].split()
                return words[0] if words else ""
            if line.startswith("Tree="):
                break
    return ""


class _RawPredict:
    def __init__(self, classifier, booster: lightgbm.Booster):
        self.predict, self.predict_proba = booster.predict, classifier.predict_proba


class _BinaryClassifier:
    def __init__(self, booster: lightgbm.Booster):
        self.booster = booster

    def predict_proba(self, features) -> np.ndarray:
        positive = self.booster.predict(features)
        return np.column_stack([1.0 - positive, positive])

    def predict(self, features) -> np.ndarray:
        return (self.booster.predict(features) > 0.5).astype(np.int64)


class _MulticlassClassifier:
    def __init__(self, booster: lightgbm.Booster):
        self.booster = booster

    def predict_proba(self, features) -> np.ndarray:
        return self.booster.predict(features)

    def predict(self, features) -> np.ndarray:
        return np.argmax(self.booster.predict(features), axis=1).astype(np.int64)
