"""The framework runtimes (onnx, lightgbm, mlflow, huggingface) end to end: real models built
here, served by the server as a process, called with tritonclient and httpx; answers compared
with the framework's own, in this process."""

from __future__ import annotations

import copy
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import lightgbm
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from conftest import running_server, write_settings

FEATURES, LABELS = load_iris(return_X_y=True)
ROWS = FEATURES[[0, 60, 120]].astype(np.float32)  # one of each class


# --- models -----------------------------------------------------------------------------------

def build_onnx(folder: Path) -> LogisticRegression:
    from skl2onnx import to_onnx

    model = LogisticRegression(max_iter=1000).fit(FEATURES, LABELS)
    folder.mkdir()
    graph = to_onnx(model, FEATURES[:1].astype(np.float32), options={id(model): {"zipmap": False}}, target_opset=17)
    (folder / "model.onnx").write_bytes(graph.SerializeToString())
    write_settings(folder, {"implementation": "onnx", "parameters": {"extra": {"intra_op_num_threads": 1}}})
    zipmap = folder.parent / f"{folder.name}-zipmap"
    zipmap.mkdir()
    (zipmap / "model.onnx").write_bytes(to_onnx(model, FEATURES[:1].astype(np.float32), target_opset=17).SerializeToString())
    write_settings(zipmap, {"implementation": "onnx"})
    bad_option = folder.parent / f"{folder.name}-bad-option"
    bad_option.mkdir()
    (bad_option / "model.onnx").write_bytes(graph.SerializeToString())
    write_settings(bad_option, {"implementation": "onnx", "parameters": {"extra": {"intra_op_threads": 1}}})
    return model


def build_lightgbm(repo: Path) -> dict[str, lightgbm.Booster]:
    boosters = {
        "lgb-multiclass": lightgbm.train({"objective": "multiclass", "num_class": 3, "verbose": -1},
                                         lightgbm.Dataset(FEATURES, LABELS), num_boost_round=10),
        "lgb-binary": lightgbm.train({"objective": "binary", "verbose": -1},
                                     lightgbm.Dataset(FEATURES, (LABELS == 2).astype(int)), num_boost_round=10),
        "lgb-regression": lightgbm.train({"objective": "regression", "verbose": -1},
                                         lightgbm.Dataset(FEATURES[:, :3], FEATURES[:, 3]), num_boost_round=10),
    }
    for name, booster in boosters.items():
        (repo / name).mkdir()
        booster.save_model(str(repo / name / "model.txt"))
        write_settings(repo / name, {"implementation": "lightgbm"})
    (repo / "lgb-as-mlserver").mkdir()
    boosters["lgb-binary"].save_model(str(repo / "lgb-as-mlserver" / "model.txt"))
    write_settings(repo / "lgb-as-mlserver", {"implementation": "mlserver_lightgbm.LightGBMModel"})
    return boosters


TENSOR_PYFUNC = '''
import mlflow
import numpy as np


class WeightedSum(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        factor = (params or {}).get("factor", 1.0)
        return {"sum": (model_input["a"] + model_input["b"]) * np.float32(factor)}


mlflow.models.set_model(WeightedSum())
'''

COLUMN_PYFUNC = '''
import mlflow


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


mlflow.models.set_model(Echo())
'''

SHAPES_PYFUNC = '''
import mlflow


class Shapes(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return {"label": "cat", "scores": [{"cat": 0.9}, {"dog": 0.1}], "ragged": [[1], [2, 3]], "count": 2}


mlflow.models.set_model(Shapes())
'''

COLUMN_TYPES = {"flag": "boolean", "small": "integer", "big": "long", "single": "float", "double": "double", "text": "string"}
V2_TYPES = {"flag": "BOOL", "small": "INT32", "big": "INT64", "single": "FP32", "double": "FP64", "text": "BYTES"}


def build_mlflow(repo: Path, tmp: Path) -> LogisticRegression:
    import mlflow.pyfunc
    import mlflow.sklearn
    import pandas as pd
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    columns = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    frame = pd.DataFrame(FEATURES, columns=columns)
    model = LogisticRegression(max_iter=1000).fit(frame, LABELS)
    mlflow.sklearn.save_model(model, repo / "mlflow-iris", signature=infer_signature(frame, model.predict(frame)))
    write_settings(repo / "mlflow-iris", {"implementation": "mlflow"})

    code = tmp / "weighted_sum.py"
    code.write_text(TENSOR_PYFUNC)
    pair = (-1, 2)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), pair, "a"), TensorSpec(np.dtype(np.float32), pair, "b")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), pair, "sum")]),
        params=ParamSchema([ParamSpec("factor", "double", 1.0)]),
    )
    mlflow.pyfunc.save_model(repo / "mlflow-tensors", python_model=str(code), signature=signature)
    write_settings(repo / "mlflow-tensors", {"implementation": "mlserver_mlflow.MLflowRuntime"})

    code = tmp / "shapes.py"
    code.write_text(SHAPES_PYFUNC)
    mlflow.pyfunc.save_model(repo / "mlflow-shapes", python_model=str(code))
    write_settings(repo / "mlflow-shapes", {"implementation": "mlflow"})

    code = tmp / "echo.py"
    code.write_text(COLUMN_PYFUNC)
    schema = Schema([ColSpec(kind, name) for name, kind in COLUMN_TYPES.items()])
    mlflow.pyfunc.save_model(repo / "mlflow-columns", python_model=str(code), signature=ModelSignature(inputs=schema, outputs=schema))
    write_settings(repo / "mlflow-columns", {"requirements": ["mlflow"]})
    return model


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "in",
         "park", "who", "what", "where", "is", "was", "paris", "london", "city", "big", "small", "red", "blue", "."]


def build_huggingface(repo: Path) -> dict[str, Path]:
    import torch
    import transformers

    torch.manual_seed(0)
    vocab = repo / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab))
    bert = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64, num_labels=3)
    span = copy.deepcopy(bert)
    span.num_labels = 2  # a start and an end logit per token
    gpt = transformers.GPT2Config(vocab_size=len(VOCAB), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                  bos_token_id=2, eos_token_id=3, pad_token_id=0)
    tasks = {
        "hf-text-classification": (transformers.BertForSequenceClassification(bert), {}),
        "hf-token-classification": (transformers.BertForTokenClassification(bert), {}),
        "hf-question-answering": (transformers.BertForQuestionAnswering(span), {}),
        "hf-fill-mask": (transformers.BertForMaskedLM(bert), {"top_k": 2}),
        "hf-feature-extraction": (transformers.BertModel(bert), {}),
        "hf-text-generation": (transformers.GPT2LMHeadModel(gpt), {}),
    }
    folders = {}
    for name, (model, extra) in tasks.items():
        folder = repo / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        write_settings(folder, {"implementation": "huggingface",
                                "parameters": {"extra": {"task": name.removeprefix("hf-"), **extra}}})
        folders[name] = folder
    batched = repo / "hf-batched"
    shutil.copytree(folders["hf-text-classification"], batched)
    write_settings(batched, {"implementation": "huggingface", "max_batch_size": 4, "max_batch_time": 0.2,
                             "parameters": {"extra": {"task": "text-classification"}}})
    write_settings(repo / "hf-from-hub", {"implementation": "huggingface",
                                          "parameters": {"extra": {"task": "text-classification", "pretrained_model": "bert-base-uncased"}}})
    return folders


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    repo = tmp_path_factory.mktemp("runtimes")
    tmp = tmp_path_factory.mktemp("code")
    return {
        "repo": repo,
        "onnx": build_onnx(repo / "onnx-iris"),
        "lightgbm": build_lightgbm(repo),
        "mlflow": build_mlflow(repo, tmp),
        "huggingface": build_huggingface(repo),
    }


@pytest.fixture(scope="module")
def server(built, tmp_path_factory):
    with running_server(built["repo"], tmp_path_factory.mktemp("logs") / "server.log") as server:
        yield server


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def infer(http, model: str, inputs: list[dict], **extra) -> httpx.Response:
    return http.post(f"/v2/models/{model}/infer", json={"inputs": inputs, **extra})


def outputs(response: httpx.Response) -> dict[str, dict]:
    assert response.status_code == 200, response.text
    return {output["name"]: output for output in response.json()["outputs"]}


def refused(response: httpx.Response, *words: str) -> str:
    assert response.status_code == 400, response.text
    message = response.json()["error"]
    for word in words:
        assert word in message, message
    return message


# --- onnx -------------------------------------------------------------------------------------

def test_onnx_metadata_comes_from_the_graph(http):
    metadata = http.get("/v2/models/onnx-iris").json()
    assert metadata["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 4]}]
    assert metadata["outputs"] == [{"name": "label", "datatype": "INT64", "shape": [-1]},
                                   {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]
    config = http.get("/v2/models/onnx-iris/config").json()
    assert [tensor["name"] for tensor in config["input"]] == ["X"]


def test_onnx_answers_like_sklearn_over_http_and_grpc(server, built):
    model = built["onnx"]
    for client, module in ((httpclient.InferenceServerClient(server.http_address), httpclient),
                           (grpcclient.InferenceServerClient(server.grpc_address), grpcclient)):
        tensor = module.InferInput("X", list(ROWS.shape), "FP32")
        tensor.set_data_from_numpy(ROWS)
        result = client.infer("onnx-iris", [tensor])
        assert result.as_numpy("label").tolist() == model.predict(ROWS).tolist()
        np.testing.assert_allclose(result.as_numpy("probabilities"), model.predict_proba(ROWS), rtol=1e-4, atol=1e-5)
        only = client.infer("onnx-iris", [tensor], outputs=[module.InferRequestedOutput("probabilities")])
        assert only.as_numpy("label") is None and only.as_numpy("probabilities").shape == (3, 3)


def test_onnx_zipmap_output_is_json_text(http, built):
    answer = outputs(infer(http, "onnx-iris-zipmap", [tensor_json("X", ROWS)]))
    assert answer["output_label"]["data"] == built["onnx"].predict(ROWS).tolist()
    probabilities = [json.loads(text) for text in answer["output_probability"]["data"]]
    expected = built["onnx"].predict_proba(ROWS)
    for row, wanted in zip(probabilities, expected):
        assert [row[str(label)] for label in range(3)] == pytest.approx(wanted.tolist(), rel=1e-4, abs=1e-5)


def test_onnx_bad_inputs(http):
    refused(infer(http, "onnx-iris", [tensor_json("X", ROWS.astype(np.float64))]), "must be FP32, got FP64")
    refused(infer(http, "onnx-iris", [tensor_json("X", ROWS[:, :3])]), "onnx-iris", "dimensions")
    refused(infer(http, "onnx-iris", [tensor_json("features", ROWS)]), "no input 'features'", "['X']")
    refused(infer(http, "onnx-iris", [tensor_json("X", ROWS)], outputs=[{"name": "logits"}]), "no output 'logits'")
    assert outputs(infer(http, "onnx-iris", [tensor_json("X", ROWS)]))  # and it still serves


def test_onnx_unknown_session_option_fails_the_load_clearly(http):
    index = {entry["name"]: entry for entry in http.post("/v2/repository/index", json={}).json()}
    entry = index["onnx-iris-bad-option"]
    assert entry["state"] == "UNAVAILABLE"
    assert "unknown parameters.extra.intra_op_threads" in entry["reason"] and "intra_op_num_threads" in entry["reason"]


# --- lightgbm ---------------------------------------------------------------------------------

def test_lightgbm_classifiers_and_regressor(http, built):
    boosters = built["lightgbm"]
    multiclass = outputs(infer(http, "lgb-multiclass", [tensor_json("input-0", ROWS)], outputs=[{"name": "predict"}, {"name": "predict_proba"}]))
    probabilities = boosters["lgb-multiclass"].predict(ROWS)
    np.testing.assert_allclose(np.array(multiclass["predict_proba"]["data"]).reshape(3, 3), probabilities, rtol=1e-6)
    assert multiclass["predict"]["data"] == probabilities.argmax(axis=1).tolist()
    assert multiclass["predict"]["datatype"] == "INT64"

    binary = outputs(infer(http, "lgb-binary", [tensor_json("input-0", ROWS)], outputs=[{"name": "predict"}, {"name": "predict_proba"}]))
    positive = boosters["lgb-binary"].predict(ROWS)
    np.testing.assert_allclose(np.array(binary["predict_proba"]["data"]).reshape(3, 2), np.column_stack([1 - positive, positive]), rtol=1e-6)
    assert binary["predict"]["data"] == (positive > 0.5).astype(int).tolist()

    regression = outputs(infer(http, "lgb-regression", [tensor_json("input-0", ROWS[:, :3])]))
    np.testing.assert_allclose(regression["predict"]["data"], boosters["lgb-regression"].predict(ROWS[:, :3]), rtol=1e-6)
    refused(infer(http, "lgb-regression", [tensor_json("input-0", ROWS[:, :3])], outputs=[{"name": "predict_proba"}]),
            "no output 'predict_proba'", "['predict']")


def test_lightgbm_under_mlservers_name_answers_like_mlserver(http, built):
    """MLServer's LightGBMModel answers booster.predict() as `predict`: P(positive) here."""
    answer = outputs(infer(http, "lgb-as-mlserver", [tensor_json("input-0", ROWS)]))
    np.testing.assert_allclose(answer["predict"]["data"], built["lightgbm"]["lgb-binary"].predict(ROWS), rtol=1e-6)
    assert answer["predict"]["datatype"] == "FP64"
    assert http.get("/v2/models/lgb-as-mlserver").json()["outputs"][0] == {"name": "predict", "datatype": "FP64", "shape": [-1]}


def test_lightgbm_metadata(http):
    multiclass = http.get("/v2/models/lgb-multiclass").json()
    assert multiclass["inputs"] == [{"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}]
    assert multiclass["outputs"] == [{"name": "predict", "datatype": "INT64", "shape": [-1]},
                                     {"name": "predict_proba", "datatype": "FP64", "shape": [-1, 3]}]
    assert http.get("/v2/models/lgb-binary").json()["outputs"][1]["shape"] == [-1, 2]
    regression = http.get("/v2/models/lgb-regression").json()
    assert regression["inputs"][0]["shape"] == [-1, 3]
    assert regression["outputs"] == [{"name": "predict", "datatype": "FP64", "shape": [-1]}]


def test_lightgbm_bad_input(http):
    message = refused(infer(http, "lgb-multiclass", [tensor_json("input-0", ROWS[:, :2])]), "lgb-multiclass")
    assert "number of features" in message.lower()
    assert outputs(infer(http, "lgb-multiclass", [tensor_json("input-0", ROWS)]))


# --- mlflow -----------------------------------------------------------------------------------

def test_mlflow_signature_becomes_metadata(http):
    columns = http.get("/v2/models/mlflow-columns").json()
    assert columns["inputs"] == [{"name": name, "datatype": V2_TYPES[name], "shape": [-1]} for name in COLUMN_TYPES]
    tensors = http.get("/v2/models/mlflow-tensors").json()
    assert tensors["inputs"] == [{"name": "a", "datatype": "FP32", "shape": [-1, 2]}, {"name": "b", "datatype": "FP32", "shape": [-1, 2]}]
    assert tensors["outputs"] == [{"name": "sum", "datatype": "FP32", "shape": [-1, 2]}]
    iris = http.get("/v2/models/mlflow-iris").json()
    assert [tensor["name"] for tensor in iris["inputs"]] == ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    assert {tensor["datatype"] for tensor in iris["inputs"]} == {"FP64"}


def test_mlflow_column_requests(http, built):
    names = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    rows = ROWS.astype(np.float64)
    expected = built["mlflow"].predict(rows).tolist()
    per_column = outputs(infer(http, "mlflow-iris", [tensor_json(name, rows[:, i]) for i, name in enumerate(names)]))
    assert per_column["output-1"]["data"] == expected
    as_columns = outputs(infer(http, "mlflow-iris", [tensor_json(name, rows[:, i:i + 1]) for i, name in enumerate(names)]))
    assert as_columns["output-1"]["data"] == expected  # [rows, 1] tensors are columns too
    single = outputs(infer(http, "mlflow-iris", [tensor_json("input-0", rows)]))  # one 2-D tensor: the signature names its columns
    assert single["output-1"]["data"] == expected

    values = {"flag": [True, False], "small": [1, -2], "big": [2**40, 3], "single": [0.5, 1.5], "double": [0.25, 2.5], "text": ["a", "b"]}
    echoed = outputs(infer(http, "mlflow-columns", [
        {"name": name, "datatype": V2_TYPES[name], "shape": [2], "data": data} for name, data in values.items()
    ]))
    assert {name: echoed[name]["data"] for name in values} == values
    assert {name: echoed[name]["datatype"] for name in values} == V2_TYPES


def test_mlflow_named_tensors_and_params(server):
    client = grpcclient.InferenceServerClient(server.grpc_address)
    a = np.array([[1, 2], [3, 4]], dtype=np.float32)
    b = np.array([[10, 20], [30, 40]], dtype=np.float32)
    tensors = []
    for name, value in (("a", a), ("b", b)):
        tensor = grpcclient.InferInput(name, list(value.shape), "FP32")
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    np.testing.assert_array_equal(client.infer("mlflow-tensors", tensors).as_numpy("sum"), a + b)
    doubled = client.infer("mlflow-tensors", tensors, parameters={"factor": 2.0})
    np.testing.assert_array_equal(doubled.as_numpy("sum"), (a + b) * 2)


def test_mlflow_answers_of_any_shape_become_tensors(http):
    answer = outputs(infer(http, "mlflow-shapes", [tensor_json("input-0", ROWS)]))
    assert answer["label"]["data"] == ["cat"] and answer["label"]["datatype"] == "BYTES"
    assert [json.loads(text) for text in answer["scores"]["data"]] == [{"cat": 0.9}, {"dog": 0.1}]
    assert [json.loads(text) for text in answer["ragged"]["data"]] == [[1], [2, 3]]
    assert answer["count"]["data"] == [2] and answer["count"]["datatype"] == "INT64"


def test_mlflow_bad_inputs(http):
    refused(infer(http, "mlflow-iris", [tensor_json("sepal_length", np.array([1.0]))]), "mlflow-iris")
    refused(infer(http, "mlflow-tensors", [tensor_json("a", np.ones((1, 2), np.float32)), tensor_json("b", np.ones((1, 3), np.float32))]),
            "mlflow-tensors")
    refused(infer(http, "mlflow-tensors", [tensor_json("a", np.ones((1, 2), np.float32)), tensor_json("b", np.ones((1, 2), np.float32))],
                  parameters={"factor": "large"}), "factor")


def test_mlflow_scoring_protocol(http, built):
    expected = built["mlflow"].predict(ROWS.astype(np.float64)).tolist()
    names = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    split = http.post("/v2/models/mlflow-iris/invocations",
                      json={"dataframe_split": {"columns": names, "data": ROWS.astype(np.float64).tolist()}})
    assert split.status_code == 200, split.text
    assert split.json() == {"predictions": expected}
    records = http.post("/v2/models/mlflow-iris/invocations", json={"dataframe_records": [dict(zip(names, map(float, row))) for row in ROWS]})
    assert records.json() == {"predictions": expected}
    csv = "\n".join([",".join(names), *(",".join(str(float(v)) for v in row) for row in ROWS)])
    answer = http.post("/v2/models/mlflow-iris/invocations", content=csv, headers={"Content-Type": "text/csv"})
    assert answer.status_code == 200 and answer.json() == {"predictions": expected}
    tensors = http.post("/v2/models/mlflow-tensors/invocations", json={"inputs": {"a": [[1, 2]], "b": [[3, 4]]}, "params": {"factor": 3.0}})
    assert tensors.json() == {"predictions": {"sum": [[12.0, 18.0]]}}
    bad = http.post("/v2/models/mlflow-iris/invocations", content="not json", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and "error_code" in bad.json() and bad.json()["error"] == bad.json()["message"]
    assert "stack_trace" not in bad.json()
    unsupported = http.post("/v2/models/mlflow-iris/invocations", content="x", headers={"Content-Type": "text/plain"})
    assert unsupported.status_code == 415 and unsupported.headers["content-type"] == "application/json"
    assert "content types" in unsupported.json()["error"]
    for nesting in (150, 5000):  # orjson reads up to 1024 levels; MLflow's json.loads would recurse
        deep = http.post("/v2/models/mlflow-iris/invocations", content="[" * nesting + "]" * nesting,
                         headers={"Content-Type": "application/json"})
        assert deep.status_code == 400 and deep.json() == {"error": "JSON nesting depth exceeds the limit of 100"}
    ping = http.get("/v2/models/mlflow-iris/ping")
    assert ping.status_code == 200 and ping.headers["content-type"].startswith("text/plain")  # its body is no JSON
    assert http.get("/v2/models/nothing-here/ping").status_code == 404
    not_mlflow = http.post("/v2/models/lgb-binary/invocations", json={"inputs": [[1, 2, 3, 4]]})
    assert not_mlflow.status_code == 404 and "invocations" in not_mlflow.json()["error"]
    assert http.get("/v2/models/lgb-binary/ping").status_code == 404
    garbled = http.post("/v2/models/mlflow-iris/invocations", content=b'{"inputs": "\xff\xfe"}', headers={"Content-Type": "application/json"})
    assert garbled.status_code == 400, garbled.text


# --- huggingface ------------------------------------------------------------------------------

def texts_json(name: str, texts: list[str]) -> dict:
    return {"name": name, "datatype": "BYTES", "shape": [len(texts)], "data": texts}


def local_pipeline(built, name: str, **kwargs):
    import transformers

    folder = built["huggingface"][name]
    return transformers.pipeline(name.removeprefix("hf-"), model=str(folder), tokenizer=str(folder), device="cpu", **kwargs)


def answers(response: httpx.Response) -> list:
    output = outputs(response)["output"]
    assert output["datatype"] == "BYTES" and output["shape"] == [len(output["data"])]
    return [json.loads(text) for text in output["data"]]


def same(a, b) -> bool:
    """JSON documents equal up to float rounding."""
    numbers_a, numbers_b = _numbers(a), _numbers(b)
    return _strings(a) == _strings(b) and len(numbers_a) == len(numbers_b) and np.allclose(numbers_a, numbers_b, rtol=1e-4, atol=1e-5)


def _numbers(value) -> list[float]:
    if isinstance(value, dict):
        return [n for key in sorted(value) for n in _numbers(value[key])]
    if isinstance(value, list):
        return [n for item in value for n in _numbers(item)]
    return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def _strings(value) -> list[str]:
    if isinstance(value, dict):
        return [s for key in sorted(value) for s in [key, *_strings(value[key])]]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return [value] if isinstance(value, str) else []


def test_huggingface_text_tasks_answer_like_the_pipeline(http, built):
    texts = ["the cat sat on the mat .", "a dog ran in the park ."]
    cases = {"hf-text-classification": {}, "hf-token-classification": {}, "hf-feature-extraction": {}, "hf-fill-mask": {"top_k": 2}}
    for name, pipeline_kwargs in cases.items():
        inputs = [text.replace("cat", "[MASK]").replace("dog", "[MASK]") for text in texts] if name == "hf-fill-mask" else texts
        expected = json.loads(json.dumps(local_pipeline(built, name, **pipeline_kwargs)(inputs), default=_plain))
        got = answers(infer(http, name, [texts_json("args", inputs)]))
        assert len(got) == 2 and same(got, expected), (name, got, expected)
        single = answers(infer(http, name, [texts_json("args", inputs[:1])]))
        assert len(single) == 1 and same(single[0], expected[0]), (name, single, expected[0])


def test_huggingface_question_answering_and_generation(http, built):
    questions, contexts = ["where is the cat ?", "what is big ?"], ["the cat sat on the mat .", "the city is big ."]
    qa = local_pipeline(built, "hf-question-answering")
    got = answers(infer(http, "hf-question-answering", [texts_json("question", questions), texts_json("context", contexts)]))
    expected = [qa(question=q, context=c) for q, c in zip(questions, contexts)]
    assert len(got) == 2 and same(got, json.loads(json.dumps(expected, default=_plain)))
    assert all(isinstance(answer["answer"], str) for answer in got)

    lone = answers(infer(http, "hf-question-answering", [texts_json("question", questions[:1]), texts_json("context", contexts[:1])]))
    assert len(lone) == 1 and same(lone[0], json.loads(json.dumps(expected[0], default=_plain)))

    metadata = http.get("/v2/models/hf-question-answering").json()
    assert [tensor["name"] for tensor in metadata["inputs"]] == ["question", "context"]

    generated = answers(infer(http, "hf-text-generation", [texts_json("args", ["the cat"])], parameters={"max_new_tokens": 3, "do_sample": False}))
    expected = local_pipeline(built, "hf-text-generation")("the cat", max_new_tokens=3, do_sample=False)
    assert generated == [expected]


def test_huggingface_max_batch_size_is_the_pipelines_batch_size(server, http, built):
    """Concurrent requests are merged into one pipeline call of up to max_batch_size texts, and
    each caller gets its own answer back."""
    texts = ["the cat sat", "a dog ran", "the red mat", "who is big", "where is paris", "the blue city"]
    expected = local_pipeline(built, "hf-text-classification")(texts)
    with ThreadPoolExecutor(len(texts)) as pool:
        got = list(pool.map(lambda text: answers(infer(http, "hf-batched", [texts_json("args", [text])])), texts))
    assert all(len(answer) == 1 and same(answer[0], want) for answer, want in zip(got, expected)), (got, expected)
    assert "hf-batched: text-classification pipeline, batch size 4" in server.log()
    sizes = [line for line in http.get("/metrics").text.splitlines()
             if line.startswith("fleetserve_batch_size_sum") and 'model="hf-batched"' in line]
    counts = [line for line in http.get("/metrics").text.splitlines()
              if line.startswith("fleetserve_batch_size_count") and 'model="hf-batched"' in line]
    assert float(sizes[0].rsplit(" ", 1)[1]) == len(texts) and float(counts[0].rsplit(" ", 1)[1]) < len(texts)


def test_huggingface_bad_inputs(http):
    refused(infer(http, "hf-text-classification", [{"name": "args", "datatype": "FP32", "shape": [1], "data": [1.0]}]), "must be BYTES")
    refused(infer(http, "hf-question-answering", [texts_json("question", ["a", "b"]), texts_json("context", ["c"])]), "as many elements")
    refused(infer(http, "hf-question-answering", [texts_json("question", ["where ?"]), texts_json("passage", ["the cat ."])]),
            "hf-question-answering")
    assert answers(infer(http, "hf-text-classification", [texts_json("args", ["the cat"])]))
    index = {entry["name"]: entry for entry in http.post("/v2/repository/index", json={}).json()}
    assert index["hf-from-hub"]["state"] == "UNAVAILABLE"
    assert "'bert-base-uncased' is not a local folder" in index["hf-from-hub"]["reason"]


def _plain(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return float(value)


# --- helpers ----------------------------------------------------------------------------------

def tensor_json(name: str, array: np.ndarray) -> dict:
    datatype = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64"}[array.dtype]
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": array.ravel().tolist()}


def test_metadata_of_an_evicted_model_is_the_graphs(built, tmp_path):
    """An evicted model still describes itself with its runtime's metadata, kept from its load."""
    repo = tmp_path / "repo"
    for name in ("onnx-a", "onnx-b"):
        (repo / name).mkdir(parents=True)
        (repo / name / "model.onnx").write_bytes((built["repo"] / "onnx-iris" / "model.onnx").read_bytes())
        write_settings(repo / name, {"implementation": "onnx", "memory": "40Mi"})
    env = {"FLEETSERVE_MEMORY_LIMIT": "60Mi", "FLEETSERVE_OVERCOMMIT_PERCENT": "100"}
    with running_server(repo, tmp_path / "server.log", env) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        entries = http.post("/v2/repository/index", json={}).json()
        evicted = [entry["name"] for entry in entries if entry["state"] == "READY" and not entry["resident"]]
        assert len(evicted) == 1, entries
        metadata = http.get(f"/v2/models/{evicted[0]}")
        assert metadata.status_code == 200, metadata.text
        assert metadata.json()["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 4]}]
        assert outputs(infer(http, evicted[0], [tensor_json("X", ROWS)]))["label"]["data"] == built["onnx"].predict(ROWS).tolist()


# --- memory -----------------------------------------------------------------------------------

BIG_PYFUNC = '''
import mlflow
import numpy as np


class Weights(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.weights = np.load(context.artifacts["weights"])

    def predict(self, context, model_input, params=None):
        return np.asarray(model_input, dtype=np.float32) @ self.weights[:4, :2]


mlflow.models.set_model(Weights())
'''


def build_big_models(repo: Path, tmp: Path) -> dict[str, int]:
    """One model of each runtime holding tens of MB, and the bytes each at least holds."""
    import mlflow.pyfunc
    import onnx
    import torch
    import transformers
    from onnx import TensorProto, helper, numpy_helper

    sizes = {}
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((1024, 8192), dtype=np.float32)  # 32 MiB
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], "big",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 1024])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 8192])],
        [numpy_helper.from_array(weights, "W")],
    )
    (repo / "big-onnx").mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), repo / "big-onnx" / "model.onnx")
    write_settings(repo / "big-onnx", {"implementation": "onnx"})
    sizes["big-onnx"] = weights.nbytes

    np.save(tmp / "weights.npy", weights)
    (tmp / "weights_model.py").write_text(BIG_PYFUNC)
    mlflow.pyfunc.save_model(repo / "big-mlflow", python_model=str(tmp / "weights_model.py"),
                             artifacts={"weights": str(tmp / "weights.npy")})
    write_settings(repo / "big-mlflow", {"implementation": "mlflow"})
    sizes["big-mlflow"] = weights.nbytes

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                                     intermediate_size=1024, max_position_embeddings=64, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    model.save_pretrained(repo / "big-huggingface")
    (tmp / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(tmp / "vocab.txt")).save_pretrained(repo / "big-huggingface")
    write_settings(repo / "big-huggingface", {"implementation": "huggingface", "parameters": {"extra": {"task": "text-classification"}}})
    sizes["big-huggingface"] = sum(p.numel() * 4 for p in model.parameters())

    data = rng.standard_normal((5000, 8))
    booster = lightgbm.train({"objective": "regression", "num_leaves": 127, "min_data_in_leaf": 1, "verbose": -1},
                             lightgbm.Dataset(data, rng.standard_normal(5000)), num_boost_round=1000)
    (repo / "big-lightgbm").mkdir()
    booster.save_model(str(repo / "big-lightgbm" / "model.txt"))
    write_settings(repo / "big-lightgbm", {"implementation": "lightgbm"})
    sizes["big-lightgbm"] = (repo / "big-lightgbm" / "model.txt").stat().st_size // 2  # parsed trees: about 2/3 of their text
    return sizes


def rss_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def rss_reaches(pid: int, reached, seconds: float = 15) -> int:
    """The server's RSS once `reached(rss)` holds, else its last reading: an unload frees
    reference cycles, and hands freed memory back to the OS, about a second later."""
    import time

    deadline = time.monotonic() + seconds
    while True:
        value = rss_of(pid)
        if reached(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.25)


def settled_rss(pid: int) -> int:
    """The server's RSS once it stops changing."""
    import time

    time.sleep(2)
    value = rss_of(pid)
    for _ in range(20):
        time.sleep(0.5)
        now = rss_of(pid)
        if abs(now - value) < 1 << 20:
            return now
        value = now
    return value


BIG_REQUESTS = {
    "big-onnx": [{"name": "X", "datatype": "FP32", "shape": [1, 1024], "data": [0.5] * 1024}],
    "big-mlflow": [{"name": "input-0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],
    "big-huggingface": [{"name": "args", "datatype": "BYTES", "shape": [1], "data": ["the cat sat"]}],
    "big-lightgbm": [{"name": "input-0", "datatype": "FP64", "shape": [1, 8], "data": [0.1] * 8}],
}


def test_each_runtime_is_measured_and_unloading_frees_its_memory(tmp_path_factory):
    repo, tmp = tmp_path_factory.mktemp("big"), tmp_path_factory.mktemp("big-code")
    sizes = build_big_models(repo, tmp)
    with running_server(repo, tmp / "server.log") as server, httpx.Client(base_url=server.url, timeout=120) as http:
        pid = server.process.pid
        for name, size in sizes.items():
            measured = [line for line in http.get("/metrics").text.splitlines()
                        if line.startswith("fleetserve_model_memory_bytes{") and f'model="{name}"' in line and 'kind="measured"' in line]
            assert measured and float(measured[0].rsplit(" ", 1)[1]) >= 0.8 * size, (name, measured)
            # A first predict may start the framework's thread pools for good: not the model's memory.
            assert outputs(infer(http, name, BIG_REQUESTS[name]))
            assert http.post(f"/v2/repository/models/{name}/unload").status_code == 200
            # Where a load's blocks interleaved with other allocations, glibc cannot hand all of
            # an unload's pages back at once (LightGBM: half of them on the first cycle, all later),
            # so up to three cycles; a model that is never freed never gives memory back. How much
            # a reload grows RSS proves nothing: it may reuse pages an earlier unload kept. An
            # unload that gives back 0.8x the model's size proves both that it held them and freed them.
            given_back = []
            for _ in range(3):
                assert http.post(f"/v2/repository/models/{name}/load").status_code == 200
                assert outputs(infer(http, name, BIG_REQUESTS[name]))  # weights mapped from files are read now
                loaded = settled_rss(pid)
                assert http.post(f"/v2/repository/models/{name}/unload").status_code == 200
                # What the unload gave back, not `after` against `before`: a load on a new thread may
                # leave a malloc arena behind, which is the allocator's, not the model's.
                given_back.append(loaded - rss_reaches(pid, lambda rss: loaded - rss >= 0.8 * size))
                if given_back[-1] >= 0.8 * size:
                    break
            assert max(given_back) >= 0.8 * size, (name, size, given_back)
