"""The V2 documents both front doors serve: server and model metadata, model config, statistics;
and the status of pipelines and experiments.

They are built once here as plain dicts in their JSON form; gRPC parses the same dicts into
its messages, so REST and gRPC can never disagree.
"""

from __future__ import annotations

from fleetserve import __version__
from fleetserve.errors import FleetError, InvalidInput, NotFound
from fleetserve.graph.pipeline import INSPECT_TENSOR_BYTES, Pipeline, Seen
from fleetserve.graph.router import Router
from fleetserve.runtime.registry import ModelVersion, Registry

EXTENSIONS = ["binary_tensor_data", "model_repository", "statistics", "model_configuration"]


def refuse_load_overrides(parameters: dict) -> None:
    """Triton lets a load carry a config or files; fleetserve reads only the repository, so it says so."""
    overrides = [key for key in parameters if key == "config" or key.startswith("file:")]
    if overrides:
        raise InvalidInput(
            f"load parameters {overrides} are not supported: edit the model's model-settings.json in the repository"
        )


def server_metadata() -> dict:
    return {"name": "fleetserve", "version": __version__, "extensions": EXTENSIONS}


def model_metadata(registry: Registry, model: ModelVersion) -> dict:
    versions = model.backend_versions or [v for v in registry.models[model.name].versions if v is not None]
    return {
        "name": model.name,
        "versions": versions,
        "platform": _platform(model),
        "inputs": [tensor.as_dict() for tensor in model.inputs],
        "outputs": [tensor.as_dict() for tensor in model.outputs],
    }


def _platform(model: ModelVersion) -> str:
    settings = model.settings
    return model.platform or settings.platform or settings.implementation or ",".join(settings.requirements)


async def model_config(model: ModelVersion) -> dict:
    """Triton's model configuration: the backend's own where a model has one (Triton's, for a
    proxied model), else as far as a V2 model-settings file describes it."""
    if model.runtime is not None and (own := await model.runtime.backend_config()) is not None:
        return own
    settings = model.settings
    batched = settings.max_batch_size > 0

    def tensors(declared):
        out = []
        for tensor in declared:
            shape = tensor.shape or [-1]
            dims = shape[1:] if batched and shape[:1] == [-1] else shape
            out.append({"name": tensor.name, "data_type": f"TYPE_{_triton_type(tensor.datatype)}", "dims": dims})
        return out

    config = {
        "name": model.name,
        "platform": _platform(model),
        "backend": "fleetserve",
        "max_batch_size": settings.max_batch_size,
        "input": tensors(model.inputs or settings.inputs),  # the runtime's own once loaded (an ONNX graph's, say)
        "output": tensors(model.outputs or settings.outputs),
    }
    if batched and settings.max_batch_time:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": int(settings.max_batch_time * 1_000_000)}
    return config


def _triton_type(datatype: str) -> str:
    return "STRING" if datatype == "BYTES" else datatype


async def model_statistics(registry: Registry, name: str | None, version: str | None) -> dict:
    if name:
        model = registry.get(name, version)
        chosen = [model] if version else [v for v in registry.models[name].versions.values()]
    else:
        chosen = [v for m in registry.models.values() for v in m.versions.values()]
    return {"model_stats": [await _statistics(model) for model in chosen]}


async def _statistics(model: ModelVersion) -> dict:
    if model.runtime is not None:
        try:
            own = await model.runtime.backend_statistics()
        except FleetError:  # the backend is down: this server's own figures, not a failed listing
            own = None
        if own is not None:
            return own
    stats = model.stats

    def duration(count: int, ns: int) -> dict:
        return {"count": count, "ns": ns}

    zero = duration(0, 0)
    return {
        "name": model.name,
        "version": model.version or "",
        "last_inference": stats.last_inference,
        "inference_count": stats.success_count,
        "execution_count": stats.success_count,
        "inference_stats": {
            "success": duration(stats.success_count, stats.success_ns),
            "fail": duration(stats.fail_count, stats.fail_ns),
            "queue": duration(stats.success_count, stats.queue_ns),
            "compute_input": zero,
            "compute_infer": duration(stats.success_count, stats.compute_infer_ns),
            "compute_output": zero,
        },
        "batch_stats": [],
    }


# Pipelines and experiments.

def pipeline_status(router: Router, name: str, with_manifest: bool = False) -> dict:
    pipeline = router.pipelines[name]
    problem = router.pipeline_problem(name)
    document = {
        "name": name,
        "ready": problem is None,
        "steps": pipeline.models,
        "output": [str(ref) for ref in pipeline.output.inputs.refs] if pipeline.output else [],
    }
    if problem:
        document["reason"] = problem
    if with_manifest:
        document["manifest"] = pipeline.manifest
    return document


def experiment_status(router: Router, name: str, with_manifest: bool = False) -> dict:
    experiment = router.experiments[name]
    problem = router.experiment_problem(name)
    total = sum(weight for _, weight in experiment.candidates)
    document = {
        "name": name,
        "ready": problem is None,
        "resourceType": experiment.resource_type,
        "default": experiment.default,
        "candidates": [{"name": candidate, "weight": weight, "share": weight / total} for candidate, weight in experiment.candidates],
        "mirror": {"name": experiment.mirror, "percent": experiment.mirror_percent} if experiment.mirror else None,
        "requests": dict(router.routed.get(name, {})),
    }
    if problem:
        document["reason"] = problem
    if with_manifest:
        document["manifest"] = experiment.manifest
    return document


def pipeline_messages(pipeline: Pipeline, target: str | None, limit: int | None) -> dict:
    """The last messages per step (the pipeline's own under its name), newest last, narrowed
    by `target`: STEP, STEP.inputs|outputs or STEP.inputs|outputs.TENSOR."""
    step, _, rest = (target or "").partition(".")
    kind, _, tensor = rest.partition(".")
    if step and step != pipeline.name and step not in pipeline.steps:
        raise NotFound(f"pipeline '{pipeline.name}' has no step '{step}'")
    if kind and kind not in ("inputs", "outputs"):
        raise InvalidInput(f"inspect STEP.inputs or STEP.outputs, not '{kind}'")
    if limit is not None and limit < 1:
        raise InvalidInput("limit must be a positive integer")
    kinds = [kind] if kind else ["inputs", "outputs"]
    found = {}
    for key, recent in list(pipeline.inspect.items()):
        if step and key != step:
            continue
        messages = list(recent)[-limit:] if limit else list(recent)
        found[key] = [_message(message, kinds, tensor or None) for message in messages]
    return {"pipeline": pipeline.name, "messages": found}


def _message(message: dict, kinds: list[str], tensor: str | None) -> dict:
    document = {"id": message["id"]}
    for kind in kinds:
        document[kind] = [_tensor(t) for t in message[kind] if tensor is None or t.name == tensor]
    if "error" in message:
        document["error"] = message["error"]
    return document


def _tensor(seen: Seen) -> dict:
    document = {"name": seen.name, "datatype": seen.datatype, "shape": seen.shape}
    if seen.data is None:
        document["data"] = None
        document["note"] = f"larger than {INSPECT_TENSOR_BYTES} bytes: not kept"
    elif seen.data.dtype.kind in "OSU":
        document["data"] = [item.decode(errors="replace") if isinstance(item, bytes) else str(item) for item in seen.data.flat]
    else:
        document["data"] = seen.data.ravel().tolist()
    return document
