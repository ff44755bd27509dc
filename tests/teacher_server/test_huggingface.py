"""Hugging Face `save_pretrained` folders as teachers: the adapters equal transformers' own forward
(tiny GPT-2, BERT and ViT built from configs, saved and loaded back), padding never reaches a real
position, unsafe folders are refused, and served ViT, GPT-2 (causal LM, sequence classifier) and
BERT (sequence and token classifiers) folders with their own fast tokenizers answer what an
in-process forward gives, with the tokenizer file's hash in ModelInfo and the file downloadable.
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
SENTENCES = [
    "the teacher gives soft targets to the student",
    "a small dog ran in the park",
    "the cat sat on the mat",
    "students learn from the soft targets of a teacher",
]
# GPT-2 style: one end-of-text token as bos and eos, and a pad token that is not id 0 (the engine
# pads with it); BERT style: [PAD] 0, [CLS] and [SEP] around each sentence.
GPT2_SPECIALS = {"unk_token": "<unk>", "bos_token": "<|endoftext|>", "pad_token": "<pad>"}
BERT_SPECIALS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}


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


def save_tokenizer(folder: Path, specials: dict[str, str]) -> Any:
    """A tiny WordLevel fast tokenizer trained on `SENTENCES`, saved beside the model the way
    `save_pretrained` of a fast tokenizer does (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token=specials["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    ordered = list(dict.fromkeys(specials.values()))
    trainer = trainers.WordLevelTrainer(vocab_size=64, special_tokens=ordered)
    tokenizer.train_from_iterator(SENTENCES, trainer)
    extra = {"eos_token": specials["bos_token"]} if "bos_token" in specials else {}
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials, **extra)
    fast.save_pretrained(folder)
    return fast


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


def test_sequence_configs_are_derived_and_load(tmp_path: Path) -> None:
    _, folder = gpt2(tmp_path / "gpt2", "GPT2LMHeadModel")
    config = huggingface_model_config(
        folder, "gpt2", json.loads((folder / "config.json").read_text())
    )
    assert (config.input_shape, config.input_dtype, config.max_value) == ((64,), "int64", 100)
    assert config.is_sequence_model and config.task_names == ("next_token",)
    assert (config.tasks[0].level, config.tasks[0].num_classes) == ("token", 100)
    assert config.tokenizer is None and "served without a tokenizer" in config.description
    module, _ = load_huggingface(folder, config)
    assert (module.vocab_size, module.head_classes) == (100, 100)
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
    gpt2(root / "tiny-gpt2", "GPT2LMHeadModel")  # no tokenizer.json: served without one
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
    untokenized = http.get("/v1/models/tiny-gpt2")  # served beside it, with no tokenizer
    assert untokenized.status_code == 200
    assert untokenized.json()["input_kind"] == "tokens"
    assert untokenized.json().get("tokenizer") is None
    assert re.search("served without a tokenizer", untokenized.json()["description"])
    assert http.get("/v1/models/tiny-gpt2/tokenizer").status_code == 412


def test_a_tokenizer_file_is_named_by_its_hash_with_the_special_ids(tmp_path: Path) -> None:
    _, folder = gpt2(tmp_path / "gpt2", "GPT2LMHeadModel")
    save_tokenizer(folder, GPT2_SPECIALS)
    # Without special tokens named in the tokenizer config, the model config's ids are used.
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 32}')
    raw = json.loads((folder / "config.json").read_text()) | {"eos_token_id": 2, "pad_token_id": 0}
    config = huggingface_model_config(folder, "gpt2", raw)
    assert config.tokenizer is not None and config.input_shape == (32,)
    assert config.tokenizer.sha256 == file_sha256((folder / "tokenizer.json").read_bytes())
    assert config.tokenizer.special_ids == {"pad": 0, "eos": 2}  # bos 50256 is outside the vocab
    # With them, the tokenizer's own ids win; the vocabulary is the file's.
    save_tokenizer(folder, GPT2_SPECIALS)
    config = huggingface_model_config(folder, "gpt2", raw)
    assert config.tokenizer is not None and config.tokenizer.special_ids == {
        "unk": 0,
        "bos": 1,
        "eos": 1,
        "pad": 2,
    }
    assert 20 < config.tokenizer.vocab_size < 64


def test_a_tokenizer_larger_than_the_model_or_malformed_is_refused(tmp_path: Path) -> None:
    _, folder = gpt2(tmp_path / "gpt2", "GPT2LMHeadModel")
    save_tokenizer(folder, GPT2_SPECIALS)
    raw = json.loads((folder / "config.json").read_text()) | {"vocab_size": 10}
    with pytest.raises(ModelLoadError, match=r"tokenizer defines \d+ ids .* below 10"):
        huggingface_model_config(folder, "gpt2", raw)
    (folder / "tokenizer.json").write_text('{"model": {"type": "WordLevel"}}')
    with pytest.raises(ModelLoadError, match="not a tokenizers file"):
        load_model(folder, torch.device("cpu"), ALLOWED)


def test_without_transformers_the_error_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, folder = vit(tmp_path / "vit")
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    with pytest.raises(ModelLoadError, match=r"pip install 'distill-teacher\[hf\]'"):
        load_model(folder, torch.device("cpu"), ALLOWED)


# --- sequence folders served by a real teacher --------------------------------------------------

SEQUENCE_FOLDERS = {
    "tiny-gpt2-lm": (gpt2, "GPT2LMHeadModel", GPT2_SPECIALS),
    "tiny-gpt2-cls": (gpt2, "GPT2ForSequenceClassification", GPT2_SPECIALS),
    "tiny-bert-cls": (bert, "BertForSequenceClassification", BERT_SPECIALS),
    "tiny-bert-tok": (bert, "BertForTokenClassification", BERT_SPECIALS),
}


@pytest.fixture(scope="module")
def served_sequences(
    tmp_path_factory: pytest.TempPathFactory,
    teacher_factory: Callable[..., Any],
    connect: Callable[..., Any],
) -> tuple[Any, Any, dict[str, tuple[torch.nn.Module, Any]]]:
    """A teacher serving the four tiny sequence folders, each with its fast tokenizer; its doors
    and, per model, (the transformers model, its tokenizer)."""
    root = tmp_path_factory.mktemp("hf_sequences")
    models = {}
    for name, (build, head, specials) in SEQUENCE_FOLDERS.items():
        model, folder = build(root / name, head)
        models[name] = (model, save_tokenizer(folder, specials))
    stub, http = connect(teacher_factory(root))
    return stub, http, models


def encoded(tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    """(ids (batch, longest) padded with 0, lengths (batch,)): `SENTENCES` through the tokenizer,
    of different lengths (what is past a length is replaced by the pad id when served)."""
    rows = [tokenizer(sentence)["input_ids"] for sentence in SENTENCES]
    ids = np.zeros((len(rows), max(map(len, rows))), dtype=np.int64)
    for row, sequence in enumerate(rows):
        ids[row, : len(sequence)] = sequence
    return ids, np.array([len(row) for row in rows])


def hf_logits(model: torch.nn.Module, ids: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
    """transformers' own forward with the attention mask; float64 logits."""
    mask = torch.arange(ids.shape[1])[None, :] < torch.from_numpy(lengths)[:, None]
    with torch.inference_mode():
        return model(input_ids=torch.from_numpy(ids), attention_mask=mask.long()).logits.double()


def soft_targets(stub: Any, name: str, ids: np.ndarray, lengths: np.ndarray, **fields: Any) -> Any:
    request = pb.SoftTargetsRequest(model=name, inputs=codec.encode(ids), **fields)
    request.lengths.CopyFrom(codec.encode(lengths.astype(np.int64)))
    return stub.GetSoftTargets(request, timeout=30)


def test_served_gpt2_lm_log_probs_equal_transformers_at_real_positions(
    served_sequences: tuple[Any, Any, dict[str, Any]],
) -> None:
    stub, http, models = served_sequences
    model, tokenizer = models["tiny-gpt2-lm"]
    ids, lengths = encoded(tokenizer)
    real = np.arange(ids.shape[1])[None, :] < lengths[:, None]  # (batch, longest)
    logits = hf_logits(model, ids, lengths)  # (batch, longest, vocab)
    info = stub.GetModelInfo(pb.GetModelInfoRequest(model="tiny-gpt2-lm"), timeout=30)
    assert info.tokenizer.special_ids["pad"] == 2  # the served pad id: padding uses it
    for temperature in (1.0, 2.0):
        expected = torch.log_softmax(logits / temperature, dim=-1)[torch.from_numpy(real)].numpy()
        dense = soft_targets(
            stub, "tiny-gpt2-lm", ids, lengths, temperature=temperature, output=pb.LOG_PROBS
        ).outputs[0]
        assert dense.level == "token"
        np.testing.assert_allclose(codec.decode(dense.values), expected, atol=1e-5)
        top = soft_targets(
            stub,
            "tiny-gpt2-lm",
            ids,
            lengths,
            temperature=temperature,
            output=pb.LOG_PROBS,
            top_k=5,
        ).outputs[0]
        best = torch.topk(torch.from_numpy(expected), 5, dim=1)
        np.testing.assert_allclose(codec.decode(top.values), best.values.numpy(), atol=1e-5)
        np.testing.assert_array_equal(codec.decode(top.indices), best.indices.numpy())
        tail = 1.0 - best.values.exp().sum(dim=1).numpy()
        np.testing.assert_allclose(codec.decode(top.tail_mass), tail, atol=1e-5)
        body = http.post(
            "/v1/models/tiny-gpt2-lm/soft-targets",
            json={
                "inputs": ids.tolist(),
                "lengths": lengths.tolist(),
                "temperature": temperature,
                "output": "log_probs",
            },
        )
        assert body.status_code == 200, body.text
        values = np.asarray(body.json()["outputs"]["next_token"]["values"])
        np.testing.assert_allclose(values, expected, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "task", "level"),
    [
        ("tiny-gpt2-cls", "label", "sequence"),
        ("tiny-bert-cls", "label", "sequence"),
        ("tiny-bert-tok", "token_label", "token"),
    ],
)
def test_served_classifiers_equal_transformers(
    served_sequences: tuple[Any, Any, dict[str, Any]], name: str, task: str, level: str
) -> None:
    stub, _, models = served_sequences
    model, tokenizer = models[name]
    ids, lengths = encoded(tokenizer)
    if name == "tiny-gpt2-cls":
        # GPT-2's classifier finds the last token by the pad id, so transformers reads each
        # sequence alone; the teacher reads the last real token of the padded batch.
        logits = torch.cat(
            [
                hf_logits(model, ids[i : i + 1, :n], lengths[i : i + 1])
                for i, n in enumerate(lengths)
            ]
        )
    else:
        logits = hf_logits(model, ids, lengths)
    if level == "token":
        logits = logits[torch.from_numpy(np.arange(ids.shape[1])[None, :] < lengths[:, None])]
    expected = torch.softmax(logits / 2.0, dim=-1).numpy()
    output = soft_targets(stub, name, ids, lengths, temperature=2.0).outputs[0]
    assert (output.task, output.level) == (task, level)
    np.testing.assert_allclose(codec.decode(output.values), expected, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SEQUENCE_FOLDERS))
def test_served_sequence_folders_name_their_tokenizer_file(
    served_sequences: tuple[Any, Any, dict[str, Any]], tmp_path: Path, name: str
) -> None:
    stub, http, models = served_sequences
    _, tokenizer = models[name]
    tokenizer.save_pretrained(tmp_path)  # the same file the folder holds
    digest = file_sha256((tmp_path / "tokenizer.json").read_bytes())
    info = stub.GetModelInfo(pb.GetModelInfoRequest(model=name), timeout=30)
    assert info.input_kind == "tokens" and info.max_length == 64 and info.vocab_size == 100
    assert info.tokenizer.sha256 == digest and info.tokenizer.file_name == "tokenizer.json"
    assert info.tokenizer.vocab_size == len(tokenizer)
    specials = GPT2_SPECIALS if name.startswith("tiny-gpt2") else BERT_SPECIALS
    expected_ids = {
        key.removesuffix("_token"): tokenizer.convert_tokens_to_ids(token)
        for key, token in specials.items()
    } | ({"eos": tokenizer.eos_token_id} if name.startswith("tiny-gpt2") else {})
    assert dict(info.tokenizer.special_ids) == expected_ids
    answer = stub.GetTokenizer(pb.GetTokenizerRequest(model=name), timeout=30)
    assert answer.sha256 == digest and answer.content == (tmp_path / "tokenizer.json").read_bytes()
    reply = http.get(f"/v1/models/{name}/tokenizer")
    assert reply.status_code == 200 and reply.headers["x-tokenizer-sha256"] == digest
