"""The default sequence teacher's small run gives a loadable folder; sequence configs parse (or
fail naming the field); the server serves a sequence model beside the others, and trains the
default one in the background after it is ready when asked (never with train_default_if_missing
off, as every other test runs)."""

from __future__ import annotations

import asyncio
import copy
import json
import math
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from protocol import codec
from protocol.v1 import teacher_pb2 as pb
from teacher_server.models.causal_transformer import CausalTransformer
from teacher_server.models.text_classifier import TokenClassifier
from teacher_server.repository.background_training import needs_default_sequence_teacher
from teacher_server.repository.default_sequence_teacher import (
    corpus_split,
    train_default_sequence_teacher,
)
from teacher_server.repository.default_teacher import DEFAULT_MODEL_NAME
from teacher_server.repository.model_config import (
    ModelConfig,
    ModelLoadError,
    TaskConfig,
    file_sha256,
    parse_config,
)
from teacher_server.repository.store import save_model
from teacher_server.serving.core import TeacherCore
from teacher_server.settings import Settings

NAME = "pydoc-causal-lm"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float]]:
    folder = tmp_path_factory.mktemp("repository") / NAME
    return folder, train_default_sequence_teacher(folder, small=True)


def _raw(folder: Path) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads((folder / "config.json").read_text())
    return raw


def test_the_split_is_by_document_fixed_and_disjoint() -> None:
    train, held_out = corpus_split()
    assert train.keys().isdisjoint(held_out.keys())
    assert len(held_out) >= 3 and len(train) > 3 * len(held_out)
    assert corpus_split() == (train, held_out)


def test_small_run_folder_reloads_with_the_same_outputs(
    trained: tuple[Path, dict[str, float]],
) -> None:
    folder, _ = trained
    assert {p.name for p in folder.iterdir()} == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    }
    config = parse_config(_raw(folder), "config.json")
    assert config.is_sequence_model and config.tokenizer is not None
    tasks = {t.name: t.num_classes for t in config.tasks}
    first = CausalTransformer(tasks, **config.kwargs).eval()
    first.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    second = copy.deepcopy(first)
    torch.manual_seed(5)
    for parameter in second.parameters():  # a fresh model: different weights until loaded
        torch.nn.init.normal_(parameter)
    second.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    ids = torch.randint(0, config.tokenizer.vocab_size, (2, 9))
    lengths = torch.tensor([9, 6])
    with torch.inference_mode():
        a, b = first(ids, lengths), second(ids, lengths)
    for task in tasks:
        torch.testing.assert_close(a[task], b[task])
    assert {f"layer_{i}" for i in range(1, config.kwargs["layers"] + 1)} == set(config.hints)


def test_tokenizer_file_matches_config_and_round_trips(
    trained: tuple[Path, dict[str, float]],
) -> None:
    folder, _ = trained
    config = parse_config(_raw(folder), "config.json")
    assert config.tokenizer is not None
    path = folder / config.tokenizer.file
    assert config.tokenizer.sha256 == file_sha256(path.read_bytes())
    tokenizer = Tokenizer.from_file(str(path))
    assert tokenizer.get_vocab_size() == config.tokenizer.vocab_size == config.max_value
    assert config.tokenizer.special_ids == {"pad": 0, "bos": 1, "eos": 2}
    text = "Assignment statements (re)bind names to values — ünïcode too.\n"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_held_out_perplexity_beats_uniform(trained: tuple[Path, dict[str, float]]) -> None:
    folder, metrics = trained
    raw = _raw(folder)
    vocab = raw["tokenizer"]["vocab_size"]
    assert math.isfinite(metrics["perplexity"]) and metrics["perplexity"] < vocab
    assert raw["held_out_metrics"]["perplexity"] == round(metrics["perplexity"], 3)
    accuracy = raw["held_out_metrics"]["topic_group_accuracy"]
    assert 0.0 <= accuracy <= 1.0
    assert raw["tasks"][1]["test_accuracy"] == accuracy


def _sequence_raw() -> dict[str, Any]:
    return {
        "name": "m",
        "architecture": "teacher_server.models.causal_transformer:CausalTransformer",
        "kwargs": {"vocab_size": 100},
        "tasks": [
            {"name": "next_token", "level": "token", "num_classes": 100},
            {"name": "group", "class_names": ["a", "b"], "test_accuracy": 0.5},
        ],
        "input": {"kind": "tokens", "vocab_size": 100, "max_length": 64},
        "tokenizer": {
            "file": "tokenizer.json",
            "sha256": "sha256:" + "ab" * 32,
            "vocab_size": 98,
            "special_ids": {"pad": 0, "eos": 2},
        },
        "hints": ["layer_1"],
        "held_out_metrics": {"perplexity": 12.5},
    }


def test_sequence_config_fields_parse_and_round_trip() -> None:
    config = parse_config(_sequence_raw(), "c.json")
    assert config.input_kind == "tokens" and config.input_shape == (64,)
    assert config.max_value == 100 and config.input_dtype == "int64"
    assert config.tasks[0] == TaskConfig("next_token", (), None, "token", 100)
    assert config.tasks[1].level == "sequence" and config.tasks[1].num_classes == 2
    assert config.tokenizer is not None and config.tokenizer.vocab_size == 98
    assert config.held_out_metrics == {"perplexity": 12.5}
    assert parse_config(config.to_json(), "again") == config


def test_existing_configs_are_unchanged() -> None:
    raw = {
        "name": "t",
        "architecture": "a.b:C",
        "tasks": [{"name": "digit", "class_names": ["0", "1"], "test_accuracy": 0.9}],
        "input": {"shape": [16], "dtype": "int64", "uint8_scale": 1.0, "max_value": 10},
        "hints": [],
    }
    config = parse_config(raw, "c.json")
    assert config.input_kind == "tensor" and config.tasks[0].level == "sequence"
    assert config.to_json() == {"description": "", "kwargs": {}} | raw


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("input", "kind"), "text", "'input.kind' must be one of ['tensor', 'tokens'], got 'text'"),
        (("input", "vocab_size"), 0, "'input.vocab_size' must be an integer >= 2, got 0"),
        (("input", "max_length"), "64", "'input.max_length' must be a positive integer, got '64'"),
        (("tasks", 0, "level"), "word", "'tasks[0].level' must be one of"),
        (("tasks", 0, "num_classes"), 1, "'tasks[0].num_classes' must be an integer >= 2"),
        (("tokenizer", "file"), "../t.json", "'tokenizer.file' must be a file name"),
        (("tokenizer", "sha256"), "md5:00", "'tokenizer.sha256' must be 'sha256:' + 64 hex"),
        (("tokenizer", "vocab_size"), 101, "'tokenizer.vocab_size' must be an integer in [2,"),
        (("tokenizer", "special_ids", "pad"), 98, "'tokenizer.special_ids.pad' must be an id"),
        (("held_out_metrics",), {"perplexity": "low"}, "'held_out_metrics' must map"),
    ],
)
def test_bad_sequence_fields_are_named(path: tuple[Any, ...], value: Any, message: str) -> None:
    raw = _sequence_raw()
    target = raw
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        parse_config(raw, "c.json")


def test_token_level_tasks_need_token_input() -> None:
    raw = _sequence_raw()
    raw["input"] = {"shape": [8], "dtype": "int64"}
    raw.pop("tokenizer")
    with pytest.raises(ModelLoadError, match=r"'tasks\[0\].level' 'token' needs input kind"):
        parse_config(raw, "c.json")


def test_the_server_serves_a_sequence_model_beside_the_others(
    trained: tuple[Path, dict[str, float]],
) -> None:
    root = trained[0].parent
    other = ModelConfig(
        name="bag",
        architecture="teacher_server.models.text_classifier:TokenClassifier",
        kwargs={"vocab_size": 50, "embedding_dim": 8},
        tasks=(TaskConfig("topic", ("a", "b")),),
        input_shape=(6,),
        input_dtype="int64",
        uint8_scale=1.0,
        hints=(),
        max_value=50,
    )
    save_model(root / "bag", other, TokenClassifier({"topic": 2}, 50, 8))
    core = TeacherCore(Settings(model_repository=root, train_default_if_missing=False))
    core.load()
    assert set(core.models) == {"bag", NAME} and not core.failures
    assert core.model_info(NAME).input_kind == "tokens"
    assert core.model_info("bag").input_kind == "tensor"


# --- trained in the background by a serving teacher ---------------------------------------------

BACKGROUND_WAIT_S = 240.0


def test_only_the_defaults_repository_gets_the_sequence_teacher(
    tmp_path: Path, trained: tuple[Path, dict[str, float]]
) -> None:
    assert needs_default_sequence_teacher(tmp_path)  # empty: the MNIST one is trained first
    (tmp_path / DEFAULT_MODEL_NAME).mkdir()
    (tmp_path / DEFAULT_MODEL_NAME / "config.json").write_text("{}")
    assert needs_default_sequence_teacher(tmp_path)
    (tmp_path / ".pydoc-causal-lm.partial-1").mkdir()  # a killed run's leftovers: hidden
    assert needs_default_sequence_teacher(tmp_path)
    shutil.copytree(trained[0], tmp_path / NAME)
    assert not needs_default_sequence_teacher(tmp_path)  # there already
    other = tmp_path.parent / (tmp_path.name + "-operator")
    shutil.copytree(trained[0], other / "my-model")
    assert not needs_default_sequence_teacher(other)  # an operator's repository: left alone


@pytest.mark.parametrize(
    "settings",
    [
        {"train_default_if_missing": False},  # what every test passes: off whatever the rest
        {"default_sequence_teacher": False},
    ],
)
def test_background_training_is_off_when_either_setting_is(
    tmp_path: Path, settings: dict[str, bool]
) -> None:
    async def started() -> bool:
        core = TeacherCore(Settings(model_repository=tmp_path, **settings))
        core.start_background_training()
        return core._training_task is not None

    assert not asyncio.run(started())


def test_the_server_serves_mnist_at_once_and_the_sequence_teacher_once_trained(
    tmp_path: Path,
    default_repository: Path,
    teacher_factory: Callable[..., Any],
    connect: Callable[..., Any],
    mnist_test_images: tuple[Any, Any],
) -> None:
    root = tmp_path / "repository"
    shutil.copytree(default_repository / DEFAULT_MODEL_NAME, root / DEFAULT_MODEL_NAME)
    teacher = teacher_factory(
        root,
        "--train-default-if-missing",
        "true",
        "--default-sequence-teacher",
        "true",
        "--default-sequence-small",
        "true",
    )
    stub, _ = connect(teacher)
    images = mnist_test_images[0][:4]
    first = stub.ListModels(pb.ListModelsRequest(), timeout=30)
    # Ready before the child has even imported torch: the MNIST teacher answers at once.
    assert [m.name for m in first.models] == [DEFAULT_MODEL_NAME]
    answer = stub.GetSoftTargets(
        pb.SoftTargetsRequest(model=DEFAULT_MODEL_NAME, inputs=codec.encode(images)), timeout=30
    )
    assert answer.outputs and answer.model == DEFAULT_MODEL_NAME
    deadline = time.monotonic() + BACKGROUND_WAIT_S
    while True:
        names = {m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models}
        if NAME in names or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert names == {DEFAULT_MODEL_NAME, NAME}, teacher.log()[-3000:]
    info = stub.GetModelInfo(pb.GetModelInfoRequest(model=NAME), timeout=30)
    assert info.input_kind == "tokens" and "perplexity" in info.held_out_metrics
    ids = np.array([[1, 5, 9, 12, 3], [1, 7, 2, 0, 0]], dtype=np.int64)
    request = pb.SoftTargetsRequest(model=NAME, inputs=codec.encode(ids), tasks=["next_token"])
    request.lengths.CopyFrom(codec.encode(np.array([5, 3], dtype=np.int64)))
    output = stub.GetSoftTargets(request, timeout=30).outputs[0]
    probs = codec.decode(output.values)
    assert probs.shape == (8, info.vocab_size)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == sorted(names)
    log = teacher.log()
    assert "training the default sequence teacher" in log
    assert re.search(r"default sequence teacher .* trained and served .*perplexity \d", log)
