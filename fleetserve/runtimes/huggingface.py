"""Hugging Face transformers pipelines, from local folders only (nothing is fetched from a hub).

`parameters.extra.task` picks the pipeline (text-classification, token-classification,
question-answering, text-generation, fill-mask, feature-extraction, ...); the model is the
model's folder (its `uri`) or `extra.pretrained_model`, a local folder too, with its tokenizer
or `extra.pretrained_tokenizer`. Every other key of `extra` is passed to `pipeline()` (e.g.
`top_k`, `aggregation_strategy`, `model_kwargs`), and `max_batch_size` becomes the pipeline's
batch size.

Requests carry text as BYTES: one input is the pipeline's positional argument, several are its
keyword arguments by name (`question` and `context` for question answering). Request parameters
become call arguments (`max_new_tokens`, `top_k`, ...). The answer is one BYTES output, `output`,
holding one JSON document per input.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from pathlib import Path
from typing import Any

from fleetserve import codecs
from fleetserve.errors import InferenceError, InvalidInput, ModelLoadError
from fleetserve.runtime.base import Runtime
from fleetserve.settings import TensorMetadata
from fleetserve.types import InferenceRequest, InferenceResponse

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: never reach for a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # its threads deadlock in forked workers

import transformers  # noqa: E402

log = logging.getLogger(__name__)

OUTPUT = "output"
# transformers builds models on the meta device by patching torch process-wide: two loads at once
# on two threads leave one model's weights on the meta device ("Cannot copy out of meta tensor").
_loading = threading.Lock()
_OWN_KEYS = ("task", "task_suffix", "pretrained_model", "pretrained_tokenizer")


class HuggingFaceRuntime(Runtime):

    def load(self) -> None:
        extra = dict(self.settings.extra)
        task = extra.get("task")
        if not isinstance(task, str) or not task:
            raise ModelLoadError(f"model '{self.name}' needs parameters.extra.task, e.g. 'text-classification'")
        task += extra.get("task_suffix") or ""
        model_folder = self._local_folder(extra.get("pretrained_model"), "pretrained_model")
        tokenizer_folder = self._local_folder(extra.get("pretrained_tokenizer"), "pretrained_tokenizer") if extra.get("pretrained_tokenizer") else model_folder
        kwargs = {key: value for key, value in extra.items() if key not in _OWN_KEYS}
        if self.settings.max_batch_size > 1:
            kwargs.setdefault("batch_size", self.settings.max_batch_size)
        try:
            with _loading:
                self.pipeline = transformers.pipeline(
                    task, model=str(model_folder), tokenizer=str(tokenizer_folder), device="cpu", **kwargs
                )
        except Exception as error:  # unknown task, a folder without a model, a bad keyword: all say why
            raise ModelLoadError(f"model '{self.name}': cannot build the {task} pipeline: {type(error).__name__}: {error}") from None
        self.task = task
        names = ("question", "context") if task == "question-answering" else ("args",)
        self.own_inputs = [TensorMetadata(name=name, datatype="BYTES", shape=[-1]) for name in names]
        self.own_outputs = [TensorMetadata(name=OUTPUT, datatype="BYTES", shape=[-1])]
        log.info("model %s: %s pipeline, batch size %s", self.name, task, kwargs.get("batch_size", 1))
        # A fast tokenizer is not reentrant (concurrent calls fail with "Already borrowed"); torch
        # uses every core within one call anyway.
        self.calling = threading.Lock()

    def _local_folder(self, configured: Any, key: str) -> Path:
        if configured is None:
            return self.settings.artifact_path
        folder = Path(configured)
        if not folder.is_absolute():
            folder = self.settings.folder / folder
        if not folder.is_dir():
            raise ModelLoadError(
                f"model '{self.name}': parameters.extra.{key} {configured!r} is not a local folder; "
                "models load from local folders only (save_pretrained), never from a hub"
            )
        return folder

    def unload(self) -> None:
        self.pipeline = None

    def footprint(self) -> int:
        # Weights are mapped from their safetensors files, and count in RSS only once read.
        model = self.pipeline.model
        return sum(tensor.numel() * tensor.element_size() for tensor in itertools.chain(model.parameters(), model.buffers()))

    def predict(self, request: InferenceRequest) -> InferenceResponse:
        texts = {tensor.name: self._texts(tensor) for tensor in request.inputs}
        count = len(next(iter(texts.values())))
        if any(len(values) != count for values in texts.values()):
            raise InvalidInput(f"model '{self.name}': every input needs as many elements; got { {k: len(v) for k, v in texts.items()} }")
        call_kwargs = request.model_parameters()
        try:
            with self.calling:
                if len(texts) == 1:
                    result = self.pipeline(next(iter(texts.values())), **call_kwargs)
                else:
                    result = self.pipeline(**texts, **call_kwargs)
        except (ValueError, TypeError, KeyError) as error:  # arguments the pipeline refuses
            raise InvalidInput(f"model '{self.name}' ({self.task}): {type(error).__name__}: {error}") from None
        answers = [codecs.json_text(item) for item in _per_input(self.task, result, count)]
        if len(answers) != count:  # a task whose answers this runtime does not know how to split
            raise InferenceError(f"model '{self.name}' ({self.task}) gave {len(answers)} answers for {count} inputs")
        return self.response([codecs.encode_tensor(OUTPUT, answers, "str")], request)

    def _texts(self, tensor) -> list[str]:
        if tensor.datatype != "BYTES":
            raise InvalidInput(f"input '{tensor.name}' of model '{self.name}' must be BYTES (text), got {tensor.datatype}")
        return codecs.decode_tensor(tensor, "str")


# Pipelines that answer a one-element list with that element's answer itself, not a list of one.
_UNWRAP_A_LONE_INPUT = ("fill-mask", "question-answering")


def _per_input(task: str, result: Any, count: int) -> list:
    """One answer per input."""
    if count == 1 and (task in _UNWRAP_A_LONE_INPUT or not (isinstance(result, list) and len(result) == 1)):
        return [result]
    return list(result)
