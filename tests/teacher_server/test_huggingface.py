"""Hugging Face `save_pretrained` folders as teachers: the adapters equal transformers' own forward
(tiny GPT-2, BERT and ViT built from configs, saved and loaded back), padding never reaches a real
position, unsafe folders are refused, and a served ViT's soft targets equal an in-process forward.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from protocol import codec
from protocol.v1 import teacher_pb2 as pb
from teacher_server.repository.huggingface_config import (
    huggingface_model_config,
    load_huggingface,
)
from teacher_server.repository.model_config import ModelLoadError, file_sha256
from teacher_server.repository.store import load_model

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ATOL = 1e-5
ALLOWED = ("teacher_server.models.",)
LENGTHS = [7, 3, 5]
VIT_LABELS = {0: "cat", 1: "dog", 2: "bird"}


def save(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def gpt2(folder: Path, head: str) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64, num_labels=3
    )
    model = getattr(transformers, head)(config).eval()
    return model, save(model, folder)


def bert(folder: Path, head: str) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=4,
    )
    model = getattr(transformers, head)(config).eval()
    return model, save(model, folder)


def vit(folder: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        id2label=VIT_LABELS,
        label2id={v: k for k, v in VIT_LABELS.items()},
    )
    model = transformers.ViTForImageClassification(config).eval()
    save(model, folder)
    transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3]
    ).save_pretrained(folder)
    return model, folder


def adapter(folder: Path) -> Any:
    """The adapter the repository would build (sequence models too, which it does not serve yet)."""
    from teacher_server.models.huggingface import build_adapter

    raw = json.loads((folder / "config.json").read_text())
    huggingface_model_config(folder, folder.name, raw)  # the safety checks run first
    return build_adapter(folder)


def padded_batch() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(input_ids (3, 7) padded with 0, lengths (3,), each sequence alone (1, length))."""
    generator = torch.Generator().manual_seed(1)
    alone = [torch.randint(1, 100, (1, n), generator=generator) for n in LENGTHS]
    ids = torch.zeros(len(LENGTHS), max(LENGTHS), dtype=torch.long)
    for row, sequence in enumerate(alone):
        ids[row, : sequence.shape[1]] = sequence[0]
    return ids, torch.tensor(LENGTHS), alone


# --- sequence models, in process ----------------------------------------------------------------


def test_gpt2_causal_lm_next_token_logits_at_real_positions(tmp_path: Path) -> None:
    model, folder = gpt2(tmp_path / "gpt2", "GPT2LMHeadModel")
    loaded = adapter(folder)
    ids, lengths, alone = padded_batch()
    with torch.inference_mode():
        outputs = loaded(ids, lengths)
        features = loaded.forward_features(ids, lengths)
        for row, sequence in enumerate(alone):
            n = sequence.shape[1]
            expected = model(input_ids=sequence).logits[0]  # (n, vocab)
            torch.testing.assert_close(outputs["next_token"][row, :n], expected, atol=ATOL, rtol=0)
            torch.testing.assert_close(features["sequence"][row], features["tokens"][row, n - 1])
    assert loaded.task_levels == {"next_token": "token"}
    assert (loaded.vocab_size, loaded.max_length) == (100, 64)
    assert (
        outputs["next_token"].shape == (3, 7, 100) and outputs["next_token"].dtype == torch.float32
    )
    assert set(features) == {"tokens", "sequence", "layer_0", "layer_1", "layer_2"}


def test_gpt2_sequence_classification_reads_the_last_real_token(tmp_path: Path) -> None:
    model, folder = gpt2(tmp_path / "gpt2-cls", "GPT2ForSequenceClassification")
    loaded = adapter(folder)
    ids, lengths, alone = padded_batch()
    with torch.inference_mode():
        logits = loaded(ids, lengths)["label"]  # (batch, classes)
        expected = torch.cat([model(input_ids=sequence).logits for sequence in alone])
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
    assert loaded.task_levels == {"label": "sequence"}


def test_bert_sequence_classification_reads_the_pooled_cls(tmp_path: Path) -> None:
    model, folder = bert(tmp_path / "bert-cls", "BertForSequenceClassification")
    loaded = adapter(folder)
    ids, lengths, alone = padded_batch()
    with torch.inference_mode():
        logits = loaded(ids, lengths)["label"]
        expected = torch.cat([model(input_ids=sequence).logits for sequence in alone])
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
    assert logits.shape == (3, 4)


def test_bert_token_classification_at_real_positions(tmp_path: Path) -> None:
    model, folder = bert(tmp_path / "bert-tok", "BertForTokenClassification")
    loaded = adapter(folder)
    ids, lengths, alone = padded_batch()
    with torch.inference_mode():
        logits = loaded(ids, lengths)["token_label"]  # (batch, length, classes)
        for row, sequence in enumerate(alone):
            expected = model(input_ids=sequence).logits[0]
            torch.testing.assert_close(
                logits[row, : sequence.shape[1]], expected, atol=ATOL, rtol=0
            )
    assert loaded.task_levels == {"token_label": "token"}


def test_sequence_configs_are_derived_and_refused_at_load(tmp_path: Path) -> None:
    _, folder = gpt2(tmp_path / "gpt2", "GPT2LMHeadModel")
    config = huggingface_model_config(
        folder, "gpt2", json.loads((folder / "config.json").read_text())
    )
    assert (config.input_shape, config.input_dtype, config.max_value) == ((64,), "int64", 100)
    assert config.is_sequence_model and config.task_names == ("next_token",)
    assert (config.tasks[0].level, config.tasks[0].num_classes) == ("token", 100)
    with pytest.raises(ModelLoadError, match="sequence models are not served yet"):
        load_huggingface(folder, config)
    _, folder = bert(tmp_path / "bert-tok", "BertForTokenClassification")
    config = huggingface_model_config(folder, "b", json.loads((folder / "config.json").read_text()))
    assert config.task_names == ("token_label",) and config.tasks[0].num_classes == 4
    assert config.tasks[0].class_names == ("LABEL_0", "LABEL_1", "LABEL_2", "LABEL_3")


# --- the image classifier, in process -----------------------------------------------------------


def normalised(pixels: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    return (pixels - mean) / std


def test_vit_adapter_normalises_raw_pixels_and_equals_the_logits(tmp_path: Path) -> None:
    model, folder = vit(tmp_path / "vit")
    loaded = load_model(folder, torch.device("cpu"), ALLOWED)
    assert loaded.config.task_names == ("label",)
    assert loaded.config.tasks[0].class_names == ("cat", "dog", "bird")
    assert (loaded.config.input_shape, loaded.config.uint8_scale) == ((3, 32, 32), 1 / 255)
    assert loaded.forward_features is not None and loaded.heads is not None
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        features = loaded.forward_features(pixels)
        logits = loaded.heads["label"](features["features"])
        expected = model(pixel_values=normalised(pixels)).logits
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
    assert features["layer_2"].shape == (4, 17, 32)  # 16 patches and the CLS token


def test_version_hashes_config_processor_and_weights(tmp_path: Path) -> None:
    _, folder = vit(tmp_path / "vit")
    first = load_model(folder, torch.device("cpu"), ALLOWED).version
    assert load_model(folder, torch.device("cpu"), ALLOWED).version == first
    processor = folder / "preprocessor_config.json"
    processor.write_text(processor.read_text().replace("0.4", "0.45"))
    assert load_model(folder, torch.device("cpu"), ALLOWED).version != first


# --- refusals -----------------------------------------------------------------------------------


def test_pickled_weights_only_are_refused_naming_the_file(tmp_path: Path) -> None:
    model, folder = vit(tmp_path / "vit")
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"only pytorch_model\.bin found.*safetensors"):
        load_model(folder, torch.device("cpu"), ALLOWED)


def test_remote_code_is_refused(tmp_path: Path) -> None:
    _, folder = vit(tmp_path / "vit")
    raw = json.loads((folder / "config.json").read_text())
    raw["auto_map"] = {"AutoModelForImageClassification": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match=r"auto_map.*trust_remote_code is never allowed"):
        load_model(folder, torch.device("cpu"), ALLOWED)


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("model.safetensors", "missing model.safetensors"),
        ("preprocessor_config.json", "missing preprocessor_config.json"),
    ],
)
def test_missing_files_are_refused(tmp_path: Path, missing: str, message: str) -> None:
    _, folder = vit(tmp_path / "vit")
    (folder / missing).unlink()
    with pytest.raises(ModelLoadError, match=message):
        load_model(folder, torch.device("cpu"), ALLOWED)


def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    _, folder = vit(tmp_path / "vit")
    raw = json.loads((folder / "config.json").read_text())
    raw["architectures"] = ["ViTForMaskedImageModeling"]
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match="'ViTForMaskedImageModeling' is not supported"):
        load_model(folder, torch.device("cpu"), ALLOWED)


# --- served by a real teacher -------------------------------------------------------------------


def test_served_vit_soft_targets_equal_an_in_process_forward(
    tmp_path: Path,
    teacher_factory: Callable[..., Any],
    connect: Callable[..., Any],
) -> None:
    root = tmp_path / "repository"
    model, _ = vit(root / "tiny-vit")
    gpt2(root / "tiny-gpt2", "GPT2LMHeadModel")  # refused at load; the ViT is still served
    stub, http = connect(teacher_factory(root))
    pixels = np.random.default_rng(3).random((5, 3, 32, 32), dtype=np.float32)
    with torch.inference_mode():
        logits = model(pixel_values=normalised(torch.from_numpy(pixels))).logits.double()
    for temperature in (1.0, 4.0):
        expected = torch.softmax(logits / temperature, dim=1).numpy()
        response = stub.GetSoftTargets(
            pb.SoftTargetsRequest(
                model="tiny-vit", inputs=codec.encode(pixels), temperature=temperature
            ),
            timeout=30,
        )
        served = codec.decode(response.outputs[0].values, "values")
        np.testing.assert_allclose(served, expected, atol=ATOL)
        body = http.post(
            "/v1/models/tiny-vit/soft-targets",
            json={"inputs": pixels.tolist(), "temperature": temperature},
        )
        assert body.status_code == 200, body.text
        values = np.asarray(body.json()["outputs"]["label"]["values"])
        np.testing.assert_allclose(values, expected, atol=ATOL)
    info = http.get("/v1/models/tiny-vit").json()
    assert "cat" in json.dumps(info) and info["model_version"] == response.model_version
    refused = http.get("/v1/models/tiny-gpt2")  # known, not loaded: its load error is the answer
    assert refused.status_code == 503
    assert re.search("sequence models.*not served yet", refused.json()["error"]["message"])


def test_a_tokenizer_file_is_named_by_its_hash_with_the_special_ids(tmp_path: Path) -> None:
    _, folder = gpt2(tmp_path / "gpt2", "GPT2LMHeadModel")
    (folder / "tokenizer.json").write_text('{"model": {"type": "WordLevel"}}')
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 32}')
    raw = json.loads((folder / "config.json").read_text()) | {"eos_token_id": 2, "pad_token_id": 0}
    config = huggingface_model_config(folder, "gpt2", raw)
    assert config.tokenizer is not None and config.input_shape == (32,)
    assert config.tokenizer.sha256 == file_sha256((folder / "tokenizer.json").read_bytes())
    assert config.tokenizer.special_ids == {"pad": 0, "eos": 2}  # bos 50256 is outside the vocab


def test_without_transformers_the_error_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, folder = vit(tmp_path / "vit")
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    with pytest.raises(ModelLoadError, match=r"pip install 'distill-teacher\[hf\]'"):
        load_model(folder, torch.device("cpu"), ALLOWED)
