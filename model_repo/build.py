"""Trains the example models into model_repo/ from data that ships with scikit-learn.

Only the artifacts are built here; each model's model-settings.json is committed beside them.
Run again to rebuild (`--force`); by default existing artifacts are kept.
"""

from __future__ import annotations

import sys
from pathlib import Path

import joblib
import xgboost
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

REPO = Path(__file__).resolve().parent


def build_iris(path: Path) -> None:
    features, labels = load_iris(return_X_y=True)
    joblib.dump(LogisticRegression(max_iter=1000).fit(features, labels), path)


def build_iris_xgboost(path: Path) -> None:
    features, labels = load_iris(return_X_y=True)
    model = xgboost.XGBClassifier(n_estimators=20, max_depth=3).fit(features, labels)
    model.save_model(path)


def build_iris_lightgbm(path: Path) -> None:
    import lightgbm

    features, labels = load_iris(return_X_y=True)
    params = {"objective": "multiclass", "num_class": 3, "verbose": -1}
    lightgbm.train(params, lightgbm.Dataset(features, labels), num_boost_round=20).save_model(str(path))


def build_iris_mlflow(path: Path) -> None:
    """An MLflow model with a column signature: one named input per feature. `path` is its MLmodel
    file, written last: a folder without one is what an interrupted build left."""
    import shutil

    import mlflow.sklearn
    from mlflow.models import infer_signature

    shutil.rmtree(path.parent, ignore_errors=True)
    frame = load_iris(as_frame=True).frame
    features = frame.drop(columns="target").rename(columns=lambda name: name.removesuffix(" (cm)").replace(" ", "_"))
    model = LogisticRegression(max_iter=1000).fit(features, frame["target"])
    mlflow.sklearn.save_model(model, path.parent, signature=infer_signature(features, model.predict(features)))


ARTIFACTS = {
    REPO / "iris" / "model.joblib": build_iris,
    REPO / "iris-xgboost" / "model.json": build_iris_xgboost,
    REPO / "iris-lightgbm" / "model.txt": build_iris_lightgbm,
    REPO / "iris-mlflow" / "model" / "MLmodel": build_iris_mlflow,
}


def main() -> None:
    force = "--force" in sys.argv
    for path, build in ARTIFACTS.items():
        if force or not path.exists():
            build(path)
            print(f"built {path.relative_to(REPO.parent)}")


if __name__ == "__main__":
    main()
