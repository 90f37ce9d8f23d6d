"""Integrated gradients for a TorchScript model, answered in alibi's explanation format.

alibi's IntegratedGradients is written for TensorFlow, and the TensorFlow alibi allows needs a
protobuf older than tritonclient's. captum computes the same attributions for PyTorch, with the
same methods and parameters (alibi's integration code is captum's), and the answer is built as
alibi builds it: meta `IntegratedGradients`, data `attributions` (one array per input), `X`,
`baselines`, `predictions`, `deltas`, `target`. Imported only when such an explainer loads:
torch and captum are an extra.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from alibi.api.defaults import DEFAULT_DATA_INTGRAD, DEFAULT_META_INTGRAD
from alibi.api.interfaces import Explanation
from alibi.utils.approximation_methods import SUPPORTED_METHODS
from alibi.version import __version__
from captum.attr import IntegratedGradients

from fleetserve.errors import InvalidInput, ModelLoadError

MODEL_FILE = "model.pt"  # also Triton's name for a PyTorch model: 1/model.pt in its repository


class TorchIntegratedGradients:
    def __init__(self, model_file: Path, method: str = "gausslegendre", n_steps: int = 50,
                 internal_batch_size: int = 100):
        if method not in SUPPORTED_METHODS:
            raise ModelLoadError(f"integrated_gradients: method must be one of {SUPPORTED_METHODS}, not {method!r}")
        if not (isinstance(n_steps, int) and n_steps > 0 and isinstance(internal_batch_size, int) and internal_batch_size > 0):
            raise ModelLoadError("integrated_gradients: n_steps and internal_batch_size must be positive integers")
        try:
            self.model = torch.jit.load(str(model_file), map_location="cpu").eval()
        except (RuntimeError, ValueError) as error:
            raise ModelLoadError(f"integrated_gradients: {model_file} is not a TorchScript model: {error}") from None
        self.gradients = IntegratedGradients(self.model)
        self.params = {"method": method, "n_steps": n_steps, "internal_batch_size": internal_batch_size}

    def explain(self, X: np.ndarray, baselines: Any = None, target: Any = None):
        rows = np.asarray(X, dtype=np.float32)
        if rows.ndim < 2:
            raise InvalidInput(f"integrated_gradients explains a batch: shape [rows, ...], got {list(rows.shape)}")
        try:
            base = np.broadcast_to(np.asarray(0 if baselines is None else baselines, dtype=np.float32), rows.shape).copy()
        except ValueError:
            raise InvalidInput(f"baselines of shape {list(np.shape(baselines))} do not fit inputs {list(rows.shape)}") from None
        inputs, base_inputs = torch.from_numpy(rows), torch.from_numpy(base)
        try:
            with torch.no_grad():
                predictions = self.model(inputs)
        except RuntimeError as error:  # TorchScript reports a wrong shape or type this way
            raise InvalidInput(f"the model cannot take inputs of shape {list(rows.shape)}: {_last_line(error)}") from None
        target = _target(target, predictions)
        attributions, deltas = self.gradients.attribute(
            inputs, baselines=base_inputs, target=target, return_convergence_delta=True, **self.params)
        meta = copy.deepcopy(DEFAULT_META_INTGRAD)
        meta.update(name="IntegratedGradients", version=__version__)
        meta["params"].update(self.params, layer="unspecified")
        data = copy.deepcopy(DEFAULT_DATA_INTGRAD)
        data.update(attributions=[attributions.detach().numpy()], X=rows, forward_kwargs={}, baselines=[base],
                    predictions=predictions.numpy(), deltas=deltas.detach().numpy(), target=target)
        return Explanation(meta=meta, data=data)


def _target(target: Any, predictions) -> list[int] | None:
    """Which output each row's attributions explain: given, else a classifier's predicted class."""
    if predictions.ndim not in (1, 2):
        raise InvalidInput(f"integrated_gradients explains outputs of shape [rows] or [rows, outputs], "
                           f"not {list(predictions.shape)}")
    if predictions.ndim == 1:
        if target is not None:
            raise InvalidInput("the model answers one number per row: give no target")
        return None
    outputs = predictions.shape[1]
    if target is None:
        return predictions.argmax(1).tolist() if outputs > 1 else None
    targets = [target] * len(predictions) if isinstance(target, int) else target
    if not (isinstance(targets, list) and len(targets) == len(predictions)
            and all(isinstance(item, int) and 0 <= item < outputs for item in targets)):
        raise InvalidInput(f"target must be an output index below {outputs}, or one per row ({len(predictions)})")
    return targets


def model_file(folders: list[Path]) -> Path:
    """The TorchScript model: `model.pt` in the first folder that has one, else in its highest
    numbered version folder (the one Triton serves by default)."""
    for folder in folders:
        if folder.is_file() and folder.suffix in (".pt", ".pth"):
            return folder
        if (folder / MODEL_FILE).is_file():
            return folder / MODEL_FILE
        versions = [child for child in folder.glob(f"*/{MODEL_FILE}") if child.parent.name.isdigit()]
        if versions:
            return max(versions, key=lambda found: int(found.parent.name))
    raise ModelLoadError(f"integrated_gradients differentiates a TorchScript model: no {MODEL_FILE} in "
                         f"{', '.join(str(folder) for folder in folders)}")


def _last_line(error: Exception) -> str:
    return str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
