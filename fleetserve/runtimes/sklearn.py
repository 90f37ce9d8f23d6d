"""scikit-learn models saved with joblib or pickle; outputs are named after the method."""

from __future__ import annotations

import joblib

from fleetserve.runtime.base import MethodRuntime

METHODS = ("predict", "predict_proba", "transform")


class SKLearnRuntime(MethodRuntime):

    def load(self) -> None:
        path = self.artifact(("model.joblib", "model.pkl", "model.pickle"), (".joblib", ".pkl", ".pickle"))
        self.model = joblib.load(path)
        # A regressor has no predict_proba: sklearn hides methods the estimator cannot serve.
        self.methods = tuple(method for method in METHODS if hasattr(self.model, method))
        self.check_methods()
