"""Alibi explainers: a model whose answer explains another model's (or a pipeline's) answer.

`parameters.extra` (as MLServer's alibi-explain runtime reads it, plus the target by name):
- `explainer_type`: anchor_tabular, anchor_text, anchor_image (black box) or integrated_gradients
  (white box: see integrated_gradients.py; it differentiates the model's TorchScript file).
- The explained target: `model_ref` or `pipeline_ref` (a Seldon manifest's `explainer.modelRef`
  or `pipelineRef`), or MLServer's `infer_uri` (`.../v2/models/NAME/infer` or
  `.../v2/pipelines/NAME/infer`). The explainer calls it in process through the router, as a
  client's request would go (experiments included), with `timeout` seconds per call (30).
- The explainer: a saved alibi explainer in the model's artifact folder (`save_explainer`), or
  built at load with `init_parameters` (the explainer's keyword arguments) and, for
  anchor_tabular, fitted on `training_data` (a .npy or .csv file in the artifact folder; a CSV
  header gives the feature names) with `fit_parameters`.

A request's first input is explained, one explanation per row (tabular), image or text, and one
for the whole batch from integrated_gradients (attributions per row, as alibi answers); request
parameter `explain_parameters` is passed to `explain()`. The answer is one BYTES output,
`explanation`, holding alibi's explanation JSON per instance.

alibi is imported at load only: it takes seconds, and is an optional extra.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import re
import sys
import threading
import types
from pathlib import Path
from typing import Any

import numpy as np

from fleetserve.codecs import bytes_to_text
from fleetserve.errors import FleetError, InferenceError, InvalidInput, ModelLoadError, NotFound, NotReady, Timeout, describe
from fleetserve.runtime.base import Runtime
from fleetserve.settings import TensorMetadata
from fleetserve.types import NUMPY_DTYPES, InferenceRequest, InferenceResponse, Tensor

OUTPUT = "explanation"
EXPLAINERS = {
    "anchor_tabular": "AnchorTabular",
    "anchor_text": "AnchorText",
    "anchor_image": "AnchorImage",
    "integrated_gradients": "IntegratedGradients",
}
_INFER_URI = re.compile(r"/v2/(models|pipelines)/([^/]+)(?:/versions/[^/]+)?/infer/?$")
# How long a load waits for the explained model or pipeline to become ready (alibi calls it once
# while the explainer is built, and a server start loads both at once), and for one that the
# server does not know yet to appear.
TARGET_WAIT = 60.0
UNKNOWN_TARGET_WAIT = 2.0


class AlibiExplainRuntime(Runtime):
    router: Any = None  # set by configure(): the explainer calls its target through it

    async def load(self) -> None:
        extra = self.settings.extra
        self.explainer_type = extra.get("explainer_type")
        if self.explainer_type not in EXPLAINERS:
            raise ModelLoadError(f"explainer '{self.name}': explainer_type must be one of {sorted(EXPLAINERS)}, "
                                 f"not {self.explainer_type!r}")
        self.target_kind, self.target = _target(self.name, extra)
        try:
            self.timeout = float(extra.get("timeout", 30))
        except (TypeError, ValueError):
            self.timeout = math.nan
        if not 0 < self.timeout <= threading.TIMEOUT_MAX:  # NaN too
            raise ModelLoadError(f"explainer '{self.name}': timeout must be a positive number of seconds, "
                                 f"not {extra.get('timeout')!r}")
        if self.router is None:
            raise ModelLoadError(f"explainer '{self.name}': no router to call its target through")
        self._loop = asyncio.get_running_loop()
        await self._wait_for_target()
        # Explanations take seconds of blocking calls: on a thread of the explainer's own, so that
        # they never hold the threads the server shares (metrics, other explainers' calls).
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"explain-{self.name}")
        try:
            self.explainer = await self._loop.run_in_executor(self._thread, self._build)
        except Exception as error:  # alibi calls the target while it builds, and wraps what that raised
            self._thread.shutdown(wait=False)
            if isinstance(error, ModelLoadError):
                raise
            raise ModelLoadError(f"explainer '{self.name}' could not be built: {describe(_reason(error))}") from None
        # alibi's anchor explainers keep the instance they explain on themselves: one explanation at
        # a time; the others wait here, where a caller that goes away stops waiting.
        self._explaining = asyncio.Lock()
        self.own_inputs = []
        self.own_outputs = [TensorMetadata(name=OUTPUT, datatype="BYTES", shape=[-1])]

    def unload(self) -> None:
        self._thread.shutdown(wait=False)

    def footprint(self) -> int:
        # A load's memory growth is not the explainer's: it calls its target while it is built.
        return arrays_held(self.explainer)

    def _build(self):
        alibi = _import_alibi(self.name)
        if self.explainer_type == "integrated_gradients":
            return self._integrated_gradients()
        folder = self.settings.artifact_path
        if (folder / "explainer.dill").is_file():
            return alibi.saving.load_explainer(str(folder), predictor=self._predict_target)
        init = dict(self.settings.extra.get("init_parameters") or {})
        explainer_class = getattr(alibi.explainers, EXPLAINERS[self.explainer_type])
        if self.explainer_type == "anchor_tabular":
            data, feature_names = _training_data(self.name, folder, self.settings.extra.get("training_data"))
            init.setdefault("feature_names", feature_names)
            if not init.get("feature_names"):
                raise ModelLoadError(f"explainer '{self.name}': anchor_tabular needs init_parameters.feature_names "
                                     "or a CSV training_data with a header")
            if isinstance(init.get("categorical_names"), dict):  # JSON keys are strings; alibi's are column numbers
                init["categorical_names"] = {int(column): values for column, values in init["categorical_names"].items()}
            explainer = explainer_class(self._predict_target, **init)
            explainer.fit(data, **(self.settings.extra.get("fit_parameters") or {}))
            return explainer
        if self.explainer_type == "anchor_text" and init.get("sampling_strategy", "unknown") in ("unknown", "similarity") \
                and "nlp" not in init:
            import spacy  # a blank pipeline tokenizes; nothing to download

            init["nlp"] = spacy.blank(str(self.settings.extra.get("language", "en")))
        try:
            return explainer_class(self._predict_target, **init)
        except TypeError as error:
            raise ModelLoadError(f"explainer '{self.name}': init_parameters: {error}") from None

    def _integrated_gradients(self):
        """White box: the explainer differentiates the model itself, a TorchScript `model.pt` in
        its own folder or else in the explained model's (integrated_gradients.model_file)."""
        try:
            from fleetserve.runtimes.integrated_gradients import TorchIntegratedGradients, model_file
        except ImportError as error:
            raise ModelLoadError(f"explainer '{self.name}' needs captum and torch ({error}): "
                                 "pip install 'fleetserve[integrated-gradients]'") from None
        folders = [self.settings.artifact_path]
        if self.target_kind == "model":
            folders.append(self.router.registry.get(self.target).settings.artifact_path)
        try:
            return TorchIntegratedGradients(model_file(folders), **(self.settings.extra.get("init_parameters") or {}))
        except ModelLoadError as error:
            raise ModelLoadError(f"explainer '{self.name}': {error.message}") from None
        except TypeError as error:
            raise ModelLoadError(f"explainer '{self.name}': init_parameters: {error}") from None

    async def _wait_for_target(self) -> None:
        started = self._loop.time()
        while (problem := self._target_problem()) is not None:
            waited = self._loop.time() - started
            if waited > TARGET_WAIT or (isinstance(problem, NotFound) and waited > UNKNOWN_TARGET_WAIT):
                raise ModelLoadError(f"explainer '{self.name}' cannot use its {self.target_kind} '{self.target}': "
                                     f"{problem.message}")
            await asyncio.sleep(0.1)

    def _target_problem(self) -> FleetError | None:
        try:
            if self.target_kind == "pipeline":
                self.router.get_pipeline(self.target)
                problem = self.router.pipeline_problem(self.target)
                return NotReady(f"pipeline '{self.target}' is not ready: {problem}") if problem else None
            self.router.registry.get_ready(self.target)
        except FleetError as error:
            return error
        return None

    def _predict_target(self, instances: Any) -> np.ndarray:
        """alibi's predictor, on an explain thread: one call of the target through the event loop."""
        data = np.array(instances, dtype=object) if isinstance(instances, list) else np.asarray(instances)
        name, dtype = self._target_input()
        if dtype is not None and dtype.kind in "biuf" and data.dtype.kind in "biuf":
            data = data.astype(dtype, copy=False)  # alibi's samples take the training data's type
        request = InferenceRequest(inputs=[Tensor(name, data)])
        future = asyncio.run_coroutine_threadsafe(self._call_target(request), self._loop)
        try:
            response = future.result(self.timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise Timeout(f"explainer '{self.name}': {self.target_kind} '{self.target}' did not answer "
                          f"within {self.timeout:g}s") from None
        if not response.outputs:
            raise InferenceError(f"explainer '{self.name}': {self.target_kind} '{self.target}' answered no output")
        return response.outputs[0].data

    async def _call_target(self, request: InferenceRequest) -> InferenceResponse:
        if self.target_kind == "pipeline":
            return (await self.router.infer_pipeline(self.target, request))[0]
        return (await self.router.infer(self.target, None, request))[0]

    def _target_input(self) -> tuple[str, np.dtype | None]:
        """The explained model's first input, its name and type, when it declares one, else
        MLServer's `predict` of any type."""
        if self.target_kind == "model":
            try:
                inputs = self.router.registry.get(self.target).inputs
            except FleetError:
                inputs = []
            if inputs:
                return inputs[0].name, NUMPY_DTYPES.get(inputs[0].datatype)
        return "predict", None

    async def predict(self, request: InferenceRequest) -> InferenceResponse:
        if not request.inputs:
            raise InvalidInput(f"explainer '{self.name}' needs one input: the instance to explain")
        parameters = request.parameters.get("explain_parameters") or {}
        if isinstance(parameters, str):  # a gRPC parameter holds no structure: JSON text
            try:
                parameters = json.loads(parameters)
            except ValueError:
                parameters = None
        if not isinstance(parameters, dict):
            raise InvalidInput(f"explainer '{self.name}': parameter explain_parameters must be an object "
                               "(over gRPC, its JSON text)")
        instances = self._instances(request.inputs[0])
        async with self._explaining:
            explanations = await self._loop.run_in_executor(self._thread, self._explain_all, instances, parameters)
        return self.response([Tensor(OUTPUT, np.array(explanations, dtype=object), {"content_type": "str"})], request)

    def _instances(self, tensor: Tensor) -> list:
        data = tensor.data
        if self.explainer_type == "anchor_text":
            if data.dtype.kind not in "OSU":
                raise InvalidInput(f"explainer '{self.name}' explains text: send BYTES, not {tensor.datatype}")
            return bytes_to_text(data)
        if data.dtype.kind in "OSU":
            raise InvalidInput(f"explainer '{self.name}' explains numbers: send a numeric tensor, not BYTES")
        if self.explainer_type == "anchor_image":
            return list(data) if data.ndim == 4 else [data]
        if self.explainer_type == "integrated_gradients":
            return [data]  # as alibi's explain(X): one explanation, attributions per row
        return list(data) if data.ndim == 2 else [data]

    def _explain_all(self, instances: list, parameters: dict) -> list[str]:
        explanations = []
        for instance in instances:
            try:
                explanations.append(self.explainer.explain(instance, **parameters).to_json())
            except Exception as error:
                reason = _reason(error)
                if isinstance(reason, FleetError):  # the target's own error, raised through alibi
                    raise type(reason)(f"explainer '{self.name}': {reason.message}") from None
                if isinstance(error, TypeError):
                    raise InvalidInput(f"explainer '{self.name}': explain_parameters: {error}") from None
                raise InferenceError(f"explainer '{self.name}' failed: {describe(error)}") from None
        return explanations


def configure(router) -> None:
    AlibiExplainRuntime.router = router


def _target(name: str, extra: dict) -> tuple[str, str]:
    model, pipeline, uri = extra.get("model_ref"), extra.get("pipeline_ref"), extra.get("infer_uri")
    if model and pipeline:
        raise ModelLoadError(f"explainer '{name}': only one of modelRef and pipelineRef")
    if model or pipeline:
        return ("model", model) if model else ("pipeline", pipeline)
    match = _INFER_URI.search(str(uri or ""))
    if match is None:
        raise ModelLoadError(f"explainer '{name}' explains nothing: give modelRef or pipelineRef (in model-settings.json "
                             "parameters.extra: model_ref, pipeline_ref, or an infer_uri ending /v2/models/NAME/infer)")
    return ("model" if match.group(1) == "models" else "pipeline"), match.group(2)


def _training_data(name: str, folder: Path, file: str | None) -> tuple[np.ndarray, list[str] | None]:
    if not file:
        raise ModelLoadError(f"explainer '{name}': no saved explainer (explainer.dill) in {folder}, and no "
                             "parameters.extra.training_data to fit one on")
    path = Path(file) if Path(file).is_absolute() else folder / file
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False), None
        import pandas

        frame = pandas.read_csv(path)
        return frame.to_numpy(), [str(column) for column in frame.columns]
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"explainer '{name}': training_data {path}: {error}") from None


def arrays_held(root: Any, most_objects: int = 100_000) -> int:
    """Bytes of the numpy arrays and torch tensors (a torch module's weights) reachable from `root`
    through attributes and containers, each counted once: an anchor explainer's training data and
    samples, an integrated-gradients model. Functions and methods are not followed: the predictor,
    bound to this runtime, would lead to the whole server."""
    torch = sys.modules.get("torch")  # imported by whatever made torch objects
    seen: set[int] = set()
    pending, total = [root], 0
    while pending and len(seen) < most_objects:
        item = pending.pop()
        if id(item) in seen or isinstance(item, _NOT_HOLDERS):
            continue
        seen.add(id(item))
        if isinstance(item, np.ndarray):
            if isinstance(item.base, np.ndarray):  # a view: its base holds the bytes
                pending.append(item.base)
            else:
                total += item.nbytes
        elif torch is not None and isinstance(item, torch.nn.Module):
            pending.extend(item.parameters())
            pending.extend(item.buffers())
        elif torch is not None and isinstance(item, torch.Tensor) and item.layout == torch.strided:
            total += item.untyped_storage().nbytes()
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            pending.extend(item)
        elif hasattr(item, "__dict__"):
            pending.extend(vars(item).values())
    return total


_NOT_HOLDERS = (type, types.ModuleType, types.FunctionType, types.MethodType, types.BuiltinFunctionType,
                str, bytes, int, float, bool, type(None))


def _reason(error: Exception) -> Exception:
    """The target's own error where alibi wrapped it (PredictorCallError), else `error`."""
    return error.__cause__ if isinstance(error.__cause__, FleetError) else error


def _import_alibi(name: str):
    try:
        import alibi.explainers
        import alibi.saving
    except ImportError as error:
        raise ModelLoadError(f"explainer '{name}' needs alibi ({error}): pip install 'fleetserve[alibi-explain]'") from None
    return alibi
