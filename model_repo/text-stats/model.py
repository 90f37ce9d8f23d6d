"""A custom model: any Runtime subclass, named by import path in model-settings.json."""

import numpy as np

from fleetserve.codecs import decode_tensor, encode_tensor
from fleetserve.runtime.base import Runtime
from fleetserve.types import InferenceRequest, InferenceResponse


class TextStats(Runtime):
    def predict(self, request: InferenceRequest) -> InferenceResponse:
        texts = decode_tensor(request.input("text"), default="str")
        lengths = np.array([len(text) for text in texts], dtype=np.int64)
        return self.response([encode_tensor("upper", [text.upper() for text in texts]), encode_tensor("length", lengths)], request)
