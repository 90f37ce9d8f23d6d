"""Framework runtimes, and how a model's settings pick one.

`implementation` may be a short name (`sklearn`), MLServer's class name
(`mlserver_sklearn.SKLearnModel`) or the import path of a user's own Runtime subclass; without
it, Seldon-style `requirements` pick the runtime. Framework modules are imported only when a
model needs them: some frameworks take seconds to import.
"""

from __future__ import annotations

import importlib
import itertools
import sys
import threading
import types
from pathlib import Path

from fleetserve.errors import ModelLoadError
from fleetserve.runtime.artifacts import redact
from fleetserve.runtime.base import Runtime
from fleetserve.settings import TRITON_CAPABILITIES, TRITON_RUNTIME, ModelSettings, is_within

_SKLEARN = "fleetserve.runtimes.sklearn.SKLearnRuntime"
_XGBOOST = "fleetserve.runtimes.xgboost.XGBoostRuntime"
_LIGHTGBM = "fleetserve.runtimes.lightgbm.LightGBMRuntime"
_ONNX = "fleetserve.runtimes.onnx.OnnxRuntime"
_MLFLOW = "fleetserve.runtimes.mlflow.MLflowRuntime"
_HUGGINGFACE = "fleetserve.runtimes.huggingface.HuggingFaceRuntime"
_TRITON = TRITON_RUNTIME
_ALIBI_EXPLAIN = "fleetserve.runtimes.alibi_explain.AlibiExplainRuntime"
_ALIBI_DETECT = "fleetserve.runtimes.alibi_detect.AlibiDetectRuntime"

BUILTIN: dict[str, str] = {
    "sklearn": _SKLEARN,
    "mlserver_sklearn.SKLearnModel": _SKLEARN,
    "xgboost": _XGBOOST,
    "mlserver_xgboost.XGBoostModel": _XGBOOST,
    "lightgbm": _LIGHTGBM,
    "mlserver_lightgbm.LightGBMModel": _LIGHTGBM,
    "onnx": _ONNX,
    "mlflow": _MLFLOW,
    "mlserver_mlflow.MLflowRuntime": _MLFLOW,
    "huggingface": _HUGGINGFACE,
    "mlserver_huggingface.HuggingFaceRuntime": _HUGGINGFACE,
    "triton": _TRITON,
    "alibi-explain": _ALIBI_EXPLAIN,
    "mlserver_alibi_explain.AlibiExplainRuntime": _ALIBI_EXPLAIN,
    "alibi-detect": _ALIBI_DETECT,
    "mlserver_alibi_detect.AlibiDetectRuntime": _ALIBI_DETECT,
}

def resolve_runtime(settings: ModelSettings, capabilities: list[str], downloads: Path | None = None) -> type[Runtime]:
    """The runtime class for a model; its `requirements` must all be among the server's `capabilities`.
    `downloads`: the folder of downloaded artifacts, whose code is not imported (None: it is)."""
    missing = [item for item in settings.requirements if item not in capabilities]
    if missing:
        triton_only = " (served by Triton: start the server with --triton-url)" if set(missing) <= set(TRITON_CAPABILITIES) else ""
        raise ModelLoadError(
            f"model '{settings.name}' requires {settings.requirements} but this server provides "
            f"{capabilities}: {missing} missing{triton_only}"
        )
    implementation = settings.chosen_implementation
    if not implementation:
        implementation = next((item for item in settings.requirements if item in BUILTIN), None)
        if implementation is None:
            raise ModelLoadError(
                f"model '{settings.name}' names no 'implementation' and its requirements "
                f"{settings.requirements} pick no runtime; runtimes: {sorted(k for k in BUILTIN if '.' not in k)}"
            )
    if implementation in BUILTIN:  # never looked up in the model's folder, where a file could shadow it
        runtime_class = _import_class(BUILTIN[implementation], None)
    else:
        own = _own_module(implementation.rpartition(".")[0], settings.folder)
        if own is not None and downloads is not None and (is_within(settings.folder, downloads) or is_within(own, downloads)):
            raise ModelLoadError(
                f"its runtime '{implementation}' is code that came with its artifacts from "
                f"remote storage ({redact(settings.uri or '')}); this server imports code from remote storage only "
                "when started with --allow-remote-code (FLEETSERVE_ALLOW_REMOTE_CODE=1)"
            )
        runtime_class = _import_class(implementation, settings.folder)
    if not (isinstance(runtime_class, type) and issubclass(runtime_class, Runtime)):
        raise ModelLoadError(f"'{implementation}' is not a subclass of fleetserve.runtime.base.Runtime")
    return runtime_class


def _import_class(path: str, folder: Path | None) -> type:
    module_name, _, class_name = path.rpartition(".")
    if not module_name:
        raise ModelLoadError(
            f"implementation '{path}' is neither a runtime name ({sorted(k for k in BUILTIN if '.' not in k)}) "
            "nor an import path like 'module.ClassName'"
        )
    try:
        module = _import_module(module_name, folder)
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(f"cannot import '{module_name}' for implementation '{path}': {type(error).__name__}: {error}") from None
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise ModelLoadError(f"module '{module_name}' has no class '{class_name}'") from None


_user_code = threading.Lock()  # sys.path is process-wide: one model's import at a time
_loads = itertools.count(1)


def _own_module(module_name: str, folder: Path | None) -> Path | None:
    """The source file of `module_name` in the model's folder, if it is there."""
    source = folder.joinpath(*module_name.split(".")).with_suffix(".py") if folder and module_name else None
    return source if source is not None and source.is_file() else None


def _import_module(module_name: str, folder: Path | None):
    """A module from the model's own folder, else from sys.path.

    Each load imports the folder as a fresh package, so two models may both ship a `model.py`,
    a reload picks up edited code, and relative imports (`from . import helpers`) stay inside the
    model. Plain `import helpers` also works (the folder is on sys.path while it loads) but, as
    in MLServer, such modules are shared by every model that imports the same name.
    """
    if _own_module(module_name, folder) is None:
        return importlib.import_module(module_name)
    package_name = f"_fleetserve_model_{next(_loads)}"
    package = types.ModuleType(package_name)
    package.__path__ = [str(folder)]
    with _user_code:
        sys.modules[package_name] = package
        sys.path.insert(0, str(folder))
        try:
            return importlib.import_module(f"{package_name}.{module_name}")
        finally:
            sys.path.remove(str(folder))
