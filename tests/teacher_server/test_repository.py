"""The model repository on a real teacher server: several models and versions served side by side,
version pinning, malformed model folders reported while the good ones serve, and packaging a
model with `package_model` and with `teacher-server package`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from protocol import codec
from protocol.v1 import teacher_pb2 as pb
from protocol.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.cli import main as cli_main
from teacher_server.models.multitask_cnn import MultiTaskCNN
from teacher_server.models.text_classifier import TokenClassifier
from teacher_server.repository.default_teacher import DEFAULT_MODEL_NAME
from teacher_server.repository.package import package_model
from teacher_server.repository.store import load_model
from tests.conftest import grpc_channel, http_client, start_teacher

TIMEOUT = 30.0
ATOL = 1e-5
CNN = "teacher_server.models.multitask_cnn:MultiTaskCNN"
TINY_KWARGS: dict[str, Any] = {"channels": [4, 8], "feature_dim": 16}
TINY_TASKS = {"digit": [str(d) for d in range(10)], "parity": ["even", "odd"]}


# --- helpers ----------------------------------------------------------------------------------


def tiny_cnn(seed: int) -> MultiTaskCNN:
    torch.manual_seed(seed)
    return MultiTaskCNN({t: len(c) for t, c in TINY_TASKS.items()}, **TINY_KWARGS).eval()


def package_tiny(out: Path, seed: int, name: str = "tiny") -> tuple[str, MultiTaskCNN]:
    module = tiny_cnn(seed)
    version = package_model(
        out,
        module,
        name=name,
        architecture=CNN,
        kwargs=TINY_KWARGS,
        tasks=TINY_TASKS,
        input_shape=(1, 28, 28),
        uint8_scale=1 / 255,
        hints=["features"],
    )
    return version, module


def expected_probs(module: torch.nn.Module, images: np.ndarray, t: float = 1.0) -> dict:
    with torch.inference_mode():
        logits = module(torch.from_numpy(images))
    return {task: torch.softmax(z.double() / t, 1).float().numpy() for task, z in logits.items()}


def grpc_outputs(response: pb.SoftTargetsResponse) -> dict[str, np.ndarray]:
    return {o.task: codec.decode(o.values, "values") for o in response.outputs}


def soft_targets(stub: pb_grpc.TeacherServiceStub, model: str, inputs: np.ndarray, **fields: Any):
    request = pb.SoftTargetsRequest(model=model, inputs=codec.encode(inputs), **fields)
    return stub.GetSoftTargets(request, timeout=TIMEOUT)


def assert_outputs(got: dict[str, Any], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for task, values in want.items():
        np.testing.assert_allclose(np.asarray(got[task]), values, atol=ATOL, err_msg=task)


def rpc_error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(7).random((4, 1, 28, 28), dtype=np.float32)


# --- two models, two versions of one ------------------------------------------------------------


def test_two_models_and_two_versions_served_at_once(
    tmp_path: Path, default_repository: Path, images: np.ndarray
) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(default_repository / DEFAULT_MODEL_NAME, repository / DEFAULT_MODEL_NAME)
    v1, module1 = package_tiny(repository / "tiny" / "1", seed=1)
    v2, module2 = package_tiny(repository / "tiny" / "2", seed=2)
    assert v1 != v2

    with (
        start_teacher(repository, tmp_path / "server") as teacher,
        grpc_channel(teacher.grpc_address) as channel,
        http_client(teacher.http_url) as http,
    ):
        stub = pb_grpc.TeacherServiceStub(channel)
        listed = stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT).models
        rows = {(m.name, m.label): m for m in listed}
        assert set(rows) == {(DEFAULT_MODEL_NAME, ""), ("tiny", "1"), ("tiny", "2")}
        assert all(m.ready and not m.error for m in listed)
        assert rows["tiny", "1"].model_version == v1 and not rows["tiny", "1"].default_version
        assert rows["tiny", "2"].model_version == v2 and rows["tiny", "2"].default_version
        assert rows[DEFAULT_MODEL_NAME, ""].default_version
        http_rows = http.get("/v1/models").json()["models"]
        assert {
            (m["name"], m["label"], m["model_version"], m["default_version"]) for m in http_rows
        } == {(m.name, m.label, m.model_version, m.default_version) for m in listed}

        # No version: the default (v2). Pinned v1: v1's own outputs, over gRPC and HTTP.
        latest = soft_targets(stub, "tiny", images)
        assert latest.model_version == v2
        assert_outputs(grpc_outputs(latest), expected_probs(module2, images))
        pinned = soft_targets(stub, "tiny", images, model_version=v1)
        assert pinned.model_version == v1
        assert_outputs(grpc_outputs(pinned), expected_probs(module1, images))
        body = {"inputs": images.tolist(), "model_version": v1}
        answer = http.post("/v1/models/tiny/soft-targets", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == v1
        assert_outputs(
            {t: o["values"] for t, o in answer.json()["outputs"].items()},
            expected_probs(module1, images),
        )
        info = stub.GetModelInfo(pb.GetModelInfoRequest(model="tiny", model_version=v1))
        assert info.model_version == v1
        assert http.get("/v1/models/tiny").json()["model_version"] == v2
        assert (
            http.get("/v1/models/tiny", params={"model_version": v1}).json()["model_version"] == v1
        )

        # The other model serves beside them.
        mnist = soft_targets(stub, DEFAULT_MODEL_NAME, images)
        assert mnist.model_version == rows[DEFAULT_MODEL_NAME, ""].model_version

        # A version not served: FAILED_PRECONDITION naming it and the served ones.
        unknown = "sha256:" + "0" * 64
        error = rpc_error(lambda: soft_targets(stub, "tiny", images, model_version=unknown))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert unknown in error.details() and v1 in error.details() and v2 in error.details()
        answer = http.post(
            "/v1/models/tiny/soft-targets",
            json={"inputs": images.tolist(), "model_version": unknown},
        )
        assert answer.status_code == 412
        assert answer.json()["error"]["field"] == "model_version"
        assert unknown in answer.json()["error"]["message"]


# --- malformed model folders ----------------------------------------------------------------


def _edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def _copy_as(source: Path, folder: Path, name: str | None = None) -> Path:
    shutil.copytree(source, folder)
    _edit_config(folder, name=name or folder.name)
    return folder


def test_malformed_folders_are_reported_and_the_good_model_serves(
    tmp_path: Path, images: np.ndarray
) -> None:
    repository = tmp_path / "repository"
    good = repository / "good"
    version, module = package_tiny(good, seed=3, name="good")

    _copy_as(good, repository / "missing-weights")
    (repository / "missing-weights" / "model.safetensors").unlink()
    _copy_as(good, repository / "bad-weights")
    _edit_config(repository / "bad-weights", kwargs={"channels": [4, 8], "feature_dim": 24})
    _copy_as(good, repository / "corrupt-weights")
    (repository / "corrupt-weights" / "model.safetensors").write_bytes(b"not safetensors")
    _copy_as(good, repository / "no-such-architecture")
    _edit_config(
        repository / "no-such-architecture",
        architecture="teacher_server.models.no_such_module:Net",
    )
    _copy_as(good, repository / "outside-prefix")
    _edit_config(repository / "outside-prefix", architecture="torch.nn:Linear")
    _copy_as(good, repository / "bad-tasks")
    _edit_config(repository / "bad-tasks", tasks="digit")
    _copy_as(good, repository / "wrong-name", name="tiny")
    _copy_as(good, repository / "bad-input-shape")
    _edit_config(
        repository / "bad-input-shape",
        input={"shape": [1, 32, 32], "dtype": "float32", "uint8_scale": 1 / 255},
    )
    tasks_json = json.loads((good / "config.json").read_text())["tasks"]
    input_json = json.loads((good / "config.json").read_text())["input"]
    for folder, members, uint8_scale in [
        ("ensemble-missing-member", ["good", "ghost"], input_json["uint8_scale"]),
        ("ensemble-other-input", ["good", "bad-weights"], input_json["uint8_scale"]),
        ("ensemble-other-scale", ["good", "good-twin"], 1.0),
        ("twins", ["good", "good-twin"], input_json["uint8_scale"]),  # a good one
        ("ensemble-of-ensembles", ["twins", "good"], input_json["uint8_scale"]),
    ]:
        (repository / folder).mkdir()
        config = {
            "name": folder,
            "ensemble": {"members": members},
            "tasks": tasks_json,
            "input": input_json | {"uint8_scale": uint8_scale},
        }
        (repository / folder / "config.json").write_text(json.dumps(config))
    package_tiny(repository / "good-twin", seed=4, name="good-twin")

    expected = {  # folder -> what its error must say
        "missing-weights": "missing model.safetensors",
        "bad-weights": "weights do not match the config",
        "corrupt-weights": "not a safetensors file",
        "no-such-architecture": "cannot be imported",
        "outside-prefix": "is not under an allowed prefix",
        "bad-tasks": "config field 'tasks' must be a non-empty list",
        "wrong-name": "config name 'tiny' does not match its folder 'wrong-name'",
        "bad-input-shape": "a forward of a zero input of shape [1, 32, 32] failed",
        "ensemble-missing-member": "ensemble member 'ghost' is not a served model",
        "ensemble-other-input": "ensemble member 'bad-weights' is not a served model",
        "ensemble-other-scale": "differ from member 'good'",
        "ensemble-of-ensembles": "ensemble member 'twins' is itself an ensemble",
    }
    with (
        start_teacher(repository, tmp_path / "server") as teacher,
        grpc_channel(teacher.grpc_address) as channel,
        http_client(teacher.http_url) as http,
    ):
        stub = pb_grpc.TeacherServiceStub(channel)
        listed = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
        assert set(listed) == {"good", "good-twin", "twins", *expected}
        assert listed["twins"].ready and listed["good-twin"].ready
        assert listed["good"].ready and listed["good"].model_version == version
        http_listed = {m["name"]: m for m in http.get("/v1/models").json()["models"]}
        for name, fault in expected.items():
            row, http_row = listed[name], http_listed[name]
            assert not row.ready and not row.model_version, name
            assert fault in row.error and name in row.error, (name, row.error)
            assert http_row["ready"] is False and http_row["error"] == row.error

            # A request to a bad model: UNAVAILABLE / 503 with the load error.
            error = rpc_error(lambda name=name: soft_targets(stub, name, images))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert row.error in error.details()
            answer = http.post(f"/v1/models/{name}/soft-targets", json={"inputs": images.tolist()})
            assert answer.status_code == 503
            assert row.error in answer.json()["error"]["message"]
            assert http.get(f"/v1/models/{name}").status_code == 503

        response = soft_targets(stub, "good", images)
        assert_outputs(grpc_outputs(response), expected_probs(module, images))
        assert "Traceback" not in teacher.log()


# --- packaging --------------------------------------------------------------------------------


def test_package_model_refuses_what_would_not_serve(tmp_path: Path) -> None:
    module = tiny_cnn(0)
    good: dict[str, Any] = {
        "name": "tiny",
        "architecture": CNN,
        "kwargs": TINY_KWARGS,
        "tasks": TINY_TASKS,
        "input_shape": (1, 28, 28),
    }
    out = tmp_path / "repository" / "tiny"
    cases = [
        ({"architecture": "teacher_server.models.text_classifier:TokenClassifier"}, "is a"),
        ({"tasks": {"digit": TINY_TASKS["digit"]}}, "`heads` must be a ModuleDict"),
        ({"tasks": {**TINY_TASKS, "digit": ["0", "1"]}}, "head 'digit' gives logits of shape [10]"),
        ({"hints": ["features", "attention"]}, "['attention'] are not returned"),
        ({"input_shape": (1, 32, 32)}, "a forward of a batch of shape [2, 1, 32, 32]"),
        ({"name": "other"}, "the model folder must be named after the model"),
        ({"max_value": 10}, "only token models"),
        ({"tasks": {"digit": TINY_TASKS["digit"], "parity": ["odd"]}}, "at least 2 class names"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError) as caught:
            package_model(out, module, **(good | change))
        assert message in str(caught.value), (change, str(caught.value))
    # kwargs that do not rebuild the module: the load-back catches it, naming `out`
    with pytest.raises(Exception, match="weights do not match the config") as caught:
        package_model(out, module, **(good | {"kwargs": {"feature_dim": 16}}))
    assert str(out) in str(caught.value) and ".package-" not in str(caught.value)
    assert not out.exists()
    assert [p.name for p in (tmp_path / "repository").iterdir()] == []  # nothing left behind

    version = package_model(out, module, **good)
    with pytest.raises(ValueError, match="already exists"):
        package_model(out, module, **good)
    with pytest.raises(ValueError, match="single-version model folder"):
        package_model(out / "2", module, **good)
    assert package_model(out, tiny_cnn(1), **good, overwrite=True) != version
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_package_cli_round_trip(
    tmp_path: Path, images: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`teacher-server package` from .pt and .safetensors weights: folders the server loads and
    serves with the weights' outputs."""
    monkeypatch.delenv("TEACHER_ALLOWED_ARCHITECTURES", raising=False)
    repository = tmp_path / "repository"
    cnn = tiny_cnn(5)
    torch.save(cnn.state_dict(), tmp_path / "cnn.pt")
    tokens = TokenClassifier({"topic": 3}, vocab_size=40, embedding_dim=8)
    save_file(tokens.state_dict(), str(tmp_path / "tokens.safetensors"))
    command = [sys.executable, "-m", "teacher_server.cli", "package"]
    cnn_args = [
        "--architecture", CNN,
        "--kwargs", json.dumps(TINY_KWARGS),
        "--weights", str(tmp_path / "cnn.pt"),
        "--task", "digit=" + ",".join(TINY_TASKS["digit"]),
        "--task", "parity=even,odd",
        "--input-shape", "1,28,28",
        "--uint8-scale", str(1 / 255),
        "--hint", "features", "--hint", "feature_map",
        "--description", "a tiny CNN",
        "--out", str(repository / "tiny" / "3"),
    ]  # fmt: skip
    done = subprocess.run(
        [*command, *cnn_args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("TEACHER_")},
    )
    assert done.returncode == 0, done.stderr
    cnn_version = done.stdout.strip().splitlines()[-1]
    assert cnn_version.startswith("sha256:")
    config = json.loads((repository / "tiny" / "3" / "config.json").read_text())
    assert config["name"] == "tiny" and config["hints"] == ["features", "feature_map"]
    assert config["description"] == "a tiny CNN" and config["kwargs"] == TINY_KWARGS

    token_args = [
        "--architecture", "teacher_server.models.text_classifier:TokenClassifier",
        "--kwargs", '{"vocab_size": 40, "embedding_dim": 8}',
        "--weights", str(tmp_path / "tokens.safetensors"),
        "--task", "topic=news,sport,science",
        "--input-shape", "6",
        "--input-dtype", "int64",
        "--max-value", "40",
        "--out", str(repository / "topics"),
    ]  # fmt: skip
    # In-process (same code path), to keep the test fast; then its errors, which exit with 2.
    cli_main(["package", *token_args])
    with pytest.raises(SystemExit) as exited:
        cli_main(["package", *token_args])
    assert exited.value.code == 2
    outside = [*token_args[:-1], str(tmp_path / "elsewhere" / "topics")]
    outside[1] = "torch.nn:Linear"
    with pytest.raises(SystemExit):
        cli_main(["package", *outside])
    assert not (tmp_path / "elsewhere" / "topics").exists()

    tokens_loaded = load_model(repository / "topics", torch.device("cpu"), ("teacher_server.",))
    assert tokens_loaded.config.max_value == 40 and tokens_loaded.config.input_dtype == "int64"
    with (
        start_teacher(repository, tmp_path / "server") as teacher,
        grpc_channel(teacher.grpc_address) as channel,
    ):
        stub = pb_grpc.TeacherServiceStub(channel)
        listed = {(m.name, m.label): m for m in stub.ListModels(pb.ListModelsRequest()).models}
        assert listed["tiny", "3"].model_version == cnn_version and listed["tiny", "3"].ready
        assert listed["topics", ""].ready
        response = soft_targets(stub, "tiny", images, hints=["feature_map"])
        assert_outputs(grpc_outputs(response), expected_probs(cnn, images))
        ids = np.random.default_rng(0).integers(0, 40, (3, 6))
        response = soft_targets(stub, "topics", ids)
        with torch.inference_mode():
            logits = tokens(torch.from_numpy(ids))["topic"]
        assert_outputs(grpc_outputs(response), {"topic": torch.softmax(logits, 1).numpy()})


def test_package_cli_uses_the_servers_prefix_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Architectures are imported only under TEACHER_ALLOWED_ARCHITECTURES (default
    `teacher_server.models.`) plus `--allow-architecture-prefix`."""
    weights = tmp_path / "w.safetensors"
    save_file(tiny_cnn(0).state_dict(), str(weights))
    out = tmp_path / "r" / "m"
    args = [
        "package", "--architecture", CNN, "--kwargs", json.dumps(TINY_KWARGS),
        "--weights", str(weights), "--task", "digit=" + ",".join(TINY_TASKS["digit"]),
        "--task", "parity=even,odd", "--input-shape", "1,28,28", "--out", str(out),
    ]  # fmt: skip
    monkeypatch.setenv("TEACHER_ALLOWED_ARCHITECTURES", '["mypackage."]')
    with pytest.raises(SystemExit) as exited:
        cli_main(args)
    assert exited.value.code == 2
    assert "is not under an allowed prefix ['mypackage.']" in capsys.readouterr().err
    assert not out.exists()
    cli_main([*args, "--allow-architecture-prefix", "teacher_server.models."])
    assert capsys.readouterr().out.strip().startswith("sha256:")
    assert (out / "config.json").is_file()
