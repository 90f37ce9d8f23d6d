"""Framework runtimes, and how a model's settings pick one.

`implementation` may be a short name (`sklearn`), MLServer's class name
(`mlserver_sklearn.SKLearnModel`) or the import path of a user's own Runtime subclass; without
it, Seldon-style `requirements` pick the runtime. Framework modules are imported only when a
model needs them: some frameworks take seconds to import.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from fleetserve.errors import ModelLoadError
from fleetserve.runtime.base import Runtime
from fleetserve.settings import ModelSettings

_SKLEARN = "fleetserve.runtimes.sklearn.SKLearnRuntime"
_XGBOOST = "fleetserve.runtimes.xgboost.XGBoostRuntime"

BUILTIN: dict[str, str] = {
    "sklearn": _SKLEARN,
    "mlserver_sklearn.SKLearnModel": _SKLEARN,
    "xgboost": _XGBOOST,
    "mlserver_xgboost.XGBoostModel": _XGBOOST,
}

# What this server can run, as Seldon Core 2 `requirements` name it.
CAPABILITIES: tuple[str, ...] = ("sklearn", "xgboost", "python")


def resolve_runtime(settings: ModelSettings) -> type[Runtime]:
    missing = [item for item in settings.requirements if item not in CAPABILITIES]
    if missing:
        raise ModelLoadError(
            f"model '{settings.name}' requires {settings.requirements} but this server provides "
            f"{list(CAPABILITIES)}: {missing} missing"
        )
    implementation = settings.implementation
    if not implementation:
        implementation = next((item for item in settings.requirements if item in BUILTIN), None)
        if implementation is None:
            raise ModelLoadError(
                f"model '{settings.name}' names no 'implementation' and its requirements "
                f"{settings.requirements} pick no runtime; runtimes: {sorted(k for k in BUILTIN if '.' not in k)}"
            )
    path = BUILTIN.get(implementation, implementation)
    runtime_class = _import_class(path, settings.folder)
    if not (isinstance(runtime_class, type) and issubclass(runtime_class, Runtime)):
        raise ModelLoadError(f"'{implementation}' is not a subclass of fleetserve.runtime.base.Runtime")
    return runtime_class


def _import_class(path: str, folder: Path) -> type:
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


def _import_module(module_name: str, folder: Path):
    """A module from the model's own folder (each model its own copy), else from sys.path."""
    source = folder.joinpath(*module_name.split(".")).with_suffix(".py")
    if not source.is_file():
        return importlib.import_module(module_name)
    # A unique name per folder: two models may both ship a `model.py`.
    unique = f"fleetserve_user_{abs(hash(str(source)))}_{module_name.replace('.', '_')}"
    spec = importlib.util.spec_from_file_location(unique, source)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(folder))  # so the model's code can import its sibling modules
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module
