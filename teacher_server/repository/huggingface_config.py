"""A Hugging Face `save_pretrained` folder as a model version: its `ModelConfig`, safety checks, load.

A model folder whose `config.json` has `model_type` and none of our `architecture` / `ensemble`
keys is a Hugging Face folder. Its config is derived, not written: the folder name is the model
name, tasks come from `id2label` (`label` for image and sequence classifiers, `token_label` for
token classifiers) or the vocabulary (`next_token` for a causal LM), the input from
`preprocessor_config.json` (images) or the tokenizer and model config (token ids).

Safety: the folder is read locally only, its weights must be safetensors (a folder with only
`pytorch_model.bin` is refused: nothing is unpickled), and a config whose `auto_map` asks for
remote code is refused (`trust_remote_code` is never set).

Served: image classifiers, and sequence models (causal LMs, sequence and token classifiers) through
the core's sequence engine. A sequence folder's `tokenizer.json` (the one file a fast tokenizer's
`save_pretrained` writes) is its tokenizer: hashed, its vocabulary counted, its special ids (pad,
bos, eos, cls, sep, unk, mask) read from `tokenizer_config.json` / `special_tokens_map.json`, else
from the model config. A folder without one is served without a tokenizer (ModelInfo says so).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from teacher_server.models.huggingface import (
    TASKS,
    HuggingFaceLoadError,
    build_adapter,
    model_kind,
)
from teacher_server.repository.model_config import (
    ModelConfig,
    ModelLoadError,
    TaskConfig,
    TokenizerConfig,
    file_sha256,
)

ADAPTER_MODULE = "teacher_server.models.huggingface"
IMAGE_ADAPTER = f"{ADAPTER_MODULE}:HuggingFaceImageClassifier"
SEQUENCE_ADAPTER = f"{ADAPTER_MODULE}:HuggingFaceSequenceModel"
PROCESSOR_FILE = "preprocessor_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
# Role -> (the tokenizer config's token key, the model config's id key).
SPECIAL_ROLES = {
    "pad": ("pad_token", "pad_token_id"),
    "bos": ("bos_token", "bos_token_id"),
    "eos": ("eos_token", "eos_token_id"),
    "cls": ("cls_token", "cls_token_id"),
    "sep": ("sep_token", "sep_token_id"),
    "unk": ("unk_token", "unk_token_id"),
    "mask": ("mask_token", "mask_token_id"),
}
NO_TOKENIZER_NOTE = (
    f"; no {TOKENIZER_FILE} in the folder: served without a tokenizer (ids are not checked "
    "against one)"
)
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def is_huggingface_config(raw: Any) -> bool:
    """Whether a decoded config.json is a Hugging Face one rather than ours."""
    return (
        isinstance(raw, dict)
        and "model_type" in raw
        and "architecture" not in raw
        and "ensemble" not in raw
    )


def is_huggingface(config: ModelConfig) -> bool:
    return config.architecture.startswith(ADAPTER_MODULE + ":")


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors weights (one file, or the shards an index names), in load order;
    `ModelLoadError` when there are none."""
    if (folder / SAFETENSORS_FILE).is_file():
        return [folder / SAFETENSORS_FILE]
    index = folder / SAFETENSORS_INDEX_FILE
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if not shards or missing:
            raise ModelLoadError(f"{index}: shards {missing or shards} are missing")
        return [index, *(folder / shard for shard in shards)]
    pickled = [name for name in PICKLE_FILES if (folder / name).is_file()]
    if pickled:
        raise ModelLoadError(
            f"{folder}: only {pickled[0]} found; weights must be safetensors (nothing is unpickled):"
            " save with save_pretrained(..., safe_serialization=True)"
        )
    raise ModelLoadError(f"{folder}: missing {SAFETENSORS_FILE}")


def huggingface_model_config(folder: Path, name: str, raw: dict[str, Any]) -> ModelConfig:
    """Our `ModelConfig` for a Hugging Face folder; `ModelLoadError` names the file and the fault."""
    config_path = folder / "config.json"
    if "auto_map" in raw:
        raise ModelLoadError(
            f"{config_path}: 'auto_map' asks for remote code {raw['auto_map']!r}; "
            "trust_remote_code is never allowed"
        )
    try:
        kind = model_kind(raw.get("architectures"))
    except HuggingFaceLoadError as error:
        raise ModelLoadError(f"{config_path}: {error}") from error
    weight_files(folder)
    task, level = TASKS[kind]
    layers = int(raw.get("num_hidden_layers", raw.get("n_layer", 0)))
    layer_hints = tuple(f"layer_{i}" for i in range(layers + 1))
    extra = {
        "huggingface": {
            "model_type": raw["model_type"],
            "architectures": raw["architectures"],
            "task_levels": {task: level},
        }
    }
    description = f"Hugging Face {raw['architectures'][0]}"
    if kind == "image_classification":
        return ModelConfig(
            architecture=IMAGE_ADAPTER,
            tasks=(TaskConfig(task, _class_names(raw, config_path)),),
            input_shape=_image_shape(folder, raw),
            input_dtype="float32",
            uint8_scale=float(_processor(folder).get("rescale_factor", 1 / 255)),
            hints=("features", *layer_hints),
            extra=extra,
            name=name,
            kwargs={},
            description=description,
        )
    vocab_size = raw.get("vocab_size")
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ModelLoadError(f"{config_path}: 'vocab_size' must be an integer >= 2")
    # A causal LM's classes are the tokenizer's tokens: counted, not listed.
    classes = () if kind == "causal_lm" else _class_names(raw, config_path)
    tokenizer = _tokenizer(folder, raw, vocab_size)
    return ModelConfig(
        architecture=SEQUENCE_ADAPTER,
        tasks=(TaskConfig(task, classes, level=level, num_classes=len(classes) or vocab_size),),
        input_shape=(_max_length(folder, raw, config_path),),
        input_dtype="int64",
        uint8_scale=1.0,
        hints=("tokens", "sequence", *layer_hints),
        max_value=vocab_size,
        extra=extra,
        name=name,
        kwargs={},
        description=description + (NO_TOKENIZER_NOTE if tokenizer is None else ""),
        input_kind="tokens",
        tokenizer=tokenizer,
    )


def load_huggingface(folder: Path, config: ModelConfig) -> tuple[nn.Module, bytes]:
    """The adapter for a Hugging Face folder, and the bytes its version hashes after config.json:
    the image processor config (images) or the tokenizer files present (sequence models:
    `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`), then the weights."""
    if config.is_sequence_model:
        names = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE)
        content = b"".join((folder / n).read_bytes() for n in names if (folder / n).is_file())
    else:
        processor = folder / PROCESSOR_FILE
        if not processor.is_file():
            raise ModelLoadError(f"{folder}: missing {PROCESSOR_FILE} (the image normalisation)")
        content = processor.read_bytes()
    content += b"".join(path.read_bytes() for path in weight_files(folder))
    try:
        module = build_adapter(folder)
    except HuggingFaceLoadError as error:
        raise ModelLoadError(f"{folder}: {error}") from error
    if config.is_sequence_model:
        _check_widths(folder, config, module)
    return module, content


def _check_widths(folder: Path, config: ModelConfig, module: nn.Module) -> None:
    """The ids the embedding reads and the classes the head writes are those config.json
    promised (a tied or resized vocabulary that disagrees would index out of range)."""
    task = config.tasks[0]
    embedding_rows = int(getattr(module, "vocab_size", 0))
    head_classes = int(getattr(module, "head_classes", 0))
    if embedding_rows != config.max_value or head_classes != task.num_classes:
        raise ModelLoadError(
            f"{folder}: the model's embedding has {embedding_rows} rows and its {task.name!r} "
            f"head {head_classes} classes, but config.json says vocab_size {config.max_value} "
            f"and {task.num_classes} classes"
        )


def _class_names(raw: dict[str, Any], config_path: Path) -> tuple[str, ...]:
    id2label = raw.get("id2label")
    if not isinstance(id2label, dict) or len(id2label) < 2:
        raise ModelLoadError(f"{config_path}: 'id2label' must map at least 2 class ids to names")
    try:
        ordered = sorted((int(i), str(label)) for i, label in id2label.items())
    except ValueError as error:
        raise ModelLoadError(f"{config_path}: 'id2label' keys must be integers") from error
    if [i for i, _ in ordered] != list(range(len(ordered))):
        raise ModelLoadError(f"{config_path}: 'id2label' keys must be 0 .. {len(ordered) - 1}")
    return tuple(label for _, label in ordered)


def _processor(folder: Path) -> dict[str, Any]:
    path = folder / PROCESSOR_FILE
    if not path.is_file():
        raise ModelLoadError(f"{folder}: missing {PROCESSOR_FILE} (the image normalisation)")
    try:
        processor = json.loads(path.read_text())
    except ValueError as error:
        raise ModelLoadError(f"{path}: not valid JSON: {error}") from error
    if not isinstance(processor, dict):
        raise ModelLoadError(f"{path}: must be a JSON object")
    return processor


def _image_shape(folder: Path, raw: dict[str, Any]) -> tuple[int, ...]:
    """(channels, height, width): the processor's `size`, else the model's `image_size`."""
    size = _processor(folder).get("size")
    if isinstance(size, dict) and "height" in size and "width" in size:
        height, width = int(size["height"]), int(size["width"])
    elif isinstance(size, dict) and "shortest_edge" in size:
        height = width = int(size["shortest_edge"])
    else:
        height = width = int(raw.get("image_size", 224))
    return (int(raw.get("num_channels", 3)), height, width)


def _max_length(folder: Path, raw: dict[str, Any], config_path: Path) -> int:
    """The longest sequence: the model's position count, or the tokenizer's shorter limit."""
    positions = raw.get("max_position_embeddings", raw.get("n_positions"))
    if not isinstance(positions, int) or positions < 1:
        raise ModelLoadError(f"{config_path}: no 'max_position_embeddings' or 'n_positions'")
    tokenizer_config = folder / TOKENIZER_CONFIG_FILE
    if tokenizer_config.is_file():
        limit = json.loads(tokenizer_config.read_text()).get("model_max_length")
        if isinstance(limit, int) and 0 < limit < positions:
            return limit
    return positions


def _tokenizer(folder: Path, raw: dict[str, Any], vocab_size: int) -> TokenizerConfig | None:
    """The folder's `tokenizer.json` (a fast tokenizer's one file): its hash, its vocabulary
    (added tokens included) and its special ids; None when the folder has none. A special id is
    the tokenizer config's token (e.g. `"pad_token": "[PAD]"`) looked up in the file, else the
    model config's `*_token_id`, kept when it lies inside the tokenizer's vocabulary."""
    from tokenizers import Tokenizer

    path = folder / TOKENIZER_FILE
    if not path.is_file():
        return None
    data = path.read_bytes()
    try:
        tokenizer = Tokenizer.from_str(data.decode())
    except Exception as error:  # tokenizers raises a bare Exception on a malformed file
        raise ModelLoadError(f"{path}: not a tokenizers file: {error}") from error
    tokens = tokenizer.get_vocab_size(with_added_tokens=True)
    if not 2 <= tokens <= vocab_size:
        raise ModelLoadError(
            f"{path}: the tokenizer defines {tokens} ids but the model reads ids below "
            f"{vocab_size} (config.json 'vocab_size')"
        )
    named = _special_tokens(folder)
    special_ids = {}
    for role, (token_key, id_key) in SPECIAL_ROLES.items():
        token_id = tokenizer.token_to_id(named[token_key]) if token_key in named else None
        if token_id is None and isinstance(raw.get(id_key), int):
            token_id = raw[id_key]
        if token_id is not None and 0 <= token_id < tokens:
            special_ids[role] = token_id
    return TokenizerConfig(TOKENIZER_FILE, file_sha256(data), tokens, special_ids)


def _special_tokens(folder: Path) -> dict[str, str]:
    """Special token key (`pad_token`, ...) -> its text, from `special_tokens_map.json` and
    `tokenizer_config.json` (the latter wins); a value may be a string or `{"content": ...}`."""
    named: dict[str, str] = {}
    for name in (SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE):
        path = folder / name
        if not path.is_file():
            continue
        try:
            entries = json.loads(path.read_text())
        except ValueError as error:
            raise ModelLoadError(f"{path}: not valid JSON: {error}") from error
        for token_key, _ in SPECIAL_ROLES.values():
            value = entries.get(token_key) if isinstance(entries, dict) else None
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                named[token_key] = value
    return named
