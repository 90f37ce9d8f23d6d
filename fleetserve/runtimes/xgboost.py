"""XGBoost models saved as JSON, UBJSON or the legacy binary format; classifiers and regressors."""

from __future__ import annotations

import json

import xgboost

from fleetserve.runtime.base import MethodRuntime

_CLASSIFIER_OBJECTIVES = ("binary:", "multi:")


class XGBoostRuntime(MethodRuntime):

    def load(self) -> None:
        path = str(self.artifact(("model.json", "model.ubj", "model.bst"), (".json", ".ubj", ".bst")))
        booster = xgboost.Booster()
        booster.load_model(path)
        objective = json.loads(booster.save_config())["learner"]["objective"]["name"]
        if objective.startswith(_CLASSIFIER_OBJECTIVES):
            self.model, self.methods = xgboost.XGBClassifier(), ("predict", "predict_proba")
        else:
            self.model, self.methods = xgboost.XGBRegressor(), ("predict",)
        self.model.load_model(path)
        self.check_methods()
