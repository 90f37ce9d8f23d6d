"""Runtime: the interface every framework runtime, and every user's custom model, implements.

A runtime loads its artifacts in `load()` and answers `predict()`. Both may be plain methods
(the data plane runs them on a worker thread, so a slow model never stalls the event loop) or
coroutines (awaited on the loop, for runtimes that do their own I/O).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fleetserve import codecs
from fleetserve.errors import InvalidInput, ModelLoadError
from fleetserve.settings import ModelSettings, TensorMetadata
from fleetserve.types import InferenceRequest, InferenceResponse, Tensor


class Runtime:
    # What the model itself says of its tensors (an ONNX graph, an MLflow signature), set by
    # load(); the tensors declared in model-settings.json win. Never mutated, only replaced.
    own_inputs: list[TensorMetadata] = []
    own_outputs: list[TensorMetadata] = []
    # A backend that keeps versions of its own under this one model (Triton's version folders):
    # the versions it serves and its platform name, set by load(); a client may address them.
    own_versions: list[str] = []
    own_platform = ""
    # Whether the data plane may run predict() on the event loop once it has proven fast: not where
    # one call of a size may cost far more than the others (a detector that gathers requests and
    # then checks all their rows at once).
    steady_cost = True

    def __init__(self, settings: ModelSettings):
        self.settings = settings

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def version(self) -> str | None:
        return self.settings.version

    def load(self) -> None:
        """Read artifacts from `self.settings.artifact_path`; raise to fail the load."""

    def unload(self) -> None:
        """Release what `load()` took."""

    def predict(self, request: InferenceRequest) -> InferenceResponse:
        raise NotImplementedError

    async def backend_ready(self) -> bool:
        """Whether the serving backend can answer for the model now (a model proxied to Triton: Triton's word)."""
        return True

    async def backend_config(self) -> dict | None:
        """The serving backend's own model configuration (a model proxied to Triton: Triton's), else None."""
        return None

    async def backend_statistics(self) -> dict | None:
        """The serving backend's own statistics for the model (one V2 `model_stats` entry), else None."""
        return None

    def footprint(self) -> int:
        """Bytes the model holds that a load's memory growth may not show (weights mapped from
        their files are resident only once read); the memory manager counts at least this."""
        return 0

    # Helpers for subclasses.

    def artifact(self, names: tuple[str, ...], suffixes: tuple[str, ...]) -> Path:
        """The model file: `uri` itself if it is a file, else a well-known name or suffix in the folder."""
        path = self.settings.artifact_path
        if path.is_file():
            return path
        if not path.is_dir():
            raise ModelLoadError(f"model '{self.name}': {path} does not exist")
        for name in names:
            if (path / name).is_file():
                return path / name
        candidates = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(suffixes))
        if len(candidates) == 1:
            return candidates[0]
        wanted = ", ".join(names)
        found = "several" if candidates else "none"
        raise ModelLoadError(f"model '{self.name}': expected one of {wanted} (or one *{'/*'.join(suffixes)}) in {path}, found {found}")

    def decode(self, request: InferenceRequest, default: str | None = None) -> Any:
        """The request as one value, by its content type, else the model's, else `default`."""
        fallback = self.settings.content_type or default or "np"
        return codecs.decode_request(request, fallback)

    def response(self, outputs: list[Tensor], request: InferenceRequest | None = None) -> InferenceResponse:
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=request.id if request else None,
            outputs=outputs,
        )

    def metadata_inputs(self) -> list[TensorMetadata]:
        return self.settings.inputs or self.own_inputs

    def metadata_outputs(self) -> list[TensorMetadata]:
        return self.settings.outputs or self.own_outputs


class MethodRuntime(Runtime):
    """A model object whose methods are its outputs (`predict`, `predict_proba`, ...).

    Subclasses load `self.model` and set `self.methods`, the methods it offers; the request's
    `outputs` pick methods by name, else `parameters.extra.predict_fn`, else `predict`, else
    the first method offered (`transform` for a transformer).
    """

    model: Any
    methods: tuple[str, ...] = ("predict",)

    @property
    def default_method(self) -> str:
        chosen = self.settings.extra.get("predict_fn")
        if chosen:
            return chosen
        return "predict" if "predict" in self.methods or not self.methods else self.methods[0]

    def check_methods(self) -> None:
        if self.default_method not in self.methods:
            raise ModelLoadError(
                f"model '{self.name}': predict_fn '{self.default_method}' is not offered by "
                f"{type(self.model).__name__}, which has {list(self.methods)}"
            )

    def predict(self, request: InferenceRequest) -> InferenceResponse:
        methods = [output.name for output in request.outputs] or [self.default_method]
        for method in methods:
            if method not in self.methods:
                raise InvalidInput(
                    f"model '{self.name}' ({type(self.model).__name__}) has no output '{method}'; "
                    f"it offers {list(self.methods)}"
                )
        features = self.decode(request)
        if isinstance(features, dict):
            raise InvalidInput(
                f"model '{self.name}' takes one input tensor, or several with request content_type 'pd'; "
                f"got {list(features)}"
            )
        outputs = [codecs.encode_tensor(method, getattr(self.model, method)(features)) for method in methods]
        return self.response(outputs, request)


def is_custom_runtime(runtime_class: type) -> bool:
    """A user's runtime (from a model folder or an installed package), not one of fleetserve's own."""
    return not runtime_class.__module__.startswith("fleetserve.")
