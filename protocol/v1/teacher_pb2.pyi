from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    FLOAT32: _ClassVar[DataType]
    FLOAT16: _ClassVar[DataType]
    BFLOAT16: _ClassVar[DataType]
    UINT8: _ClassVar[DataType]
    INT64: _ClassVar[DataType]
    INT32: _ClassVar[DataType]
    FLOAT64: _ClassVar[DataType]
    UINT16: _ClassVar[DataType]

class TopKEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOP_K_ENCODING_UNSPECIFIED: _ClassVar[TopKEncoding]
    PACKED: _ClassVar[TopKEncoding]
    PACKED_LOG_PROB_CODES: _ClassVar[TopKEncoding]

class OutputKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_KIND_UNSPECIFIED: _ClassVar[OutputKind]
    PROBS: _ClassVar[OutputKind]
    LOG_PROBS: _ClassVar[OutputKind]
    LOGITS: _ClassVar[OutputKind]
DATA_TYPE_UNSPECIFIED: DataType
FLOAT32: DataType
FLOAT16: DataType
BFLOAT16: DataType
UINT8: DataType
INT64: DataType
INT32: DataType
FLOAT64: DataType
UINT16: DataType
TOP_K_ENCODING_UNSPECIFIED: TopKEncoding
PACKED: TopKEncoding
PACKED_LOG_PROB_CODES: TopKEncoding
OUTPUT_KIND_UNSPECIFIED: OutputKind
PROBS: OutputKind
LOG_PROBS: OutputKind
LOGITS: OutputKind

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PackedInts(_message.Message):
    __slots__ = ("bits", "shape", "data")
    BITS_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    bits: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, bits: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PackedTopK(_message.Message):
    __slots__ = ("indices", "values", "values_dtype", "log_prob_step", "tail_mass", "tail_dtype")
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    VALUES_DTYPE_FIELD_NUMBER: _ClassVar[int]
    LOG_PROB_STEP_FIELD_NUMBER: _ClassVar[int]
    TAIL_MASS_FIELD_NUMBER: _ClassVar[int]
    TAIL_DTYPE_FIELD_NUMBER: _ClassVar[int]
    indices: PackedInts
    values: PackedInts
    values_dtype: DataType
    log_prob_step: float
    tail_mass: PackedInts
    tail_dtype: DataType
    def __init__(self, indices: _Optional[_Union[PackedInts, _Mapping]] = ..., values: _Optional[_Union[PackedInts, _Mapping]] = ..., values_dtype: _Optional[_Union[DataType, str]] = ..., log_prob_step: _Optional[float] = ..., tail_mass: _Optional[_Union[PackedInts, _Mapping]] = ..., tail_dtype: _Optional[_Union[DataType, str]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ...) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("name", "model_version", "ready", "default_version", "error", "label")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_version: str
    ready: bool
    default_version: bool
    error: str
    label: str
    def __init__(self, name: _Optional[str] = ..., model_version: _Optional[str] = ..., ready: _Optional[bool] = ..., default_version: _Optional[bool] = ..., error: _Optional[str] = ..., label: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model", "model_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ReloadModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ReloadModelResponse(_message.Message):
    __slots__ = ("model", "versions", "loaded", "unloaded")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    UNLOADED_FIELD_NUMBER: _ClassVar[int]
    model: str
    versions: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    loaded: _containers.RepeatedScalarFieldContainer[str]
    unloaded: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ..., loaded: _Optional[_Iterable[str]] = ..., unloaded: _Optional[_Iterable[str]] = ...) -> None: ...

class TaskInfo(_message.Message):
    __slots__ = ("name", "class_names", "test_accuracy", "level", "num_classes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    name: str
    class_names: _containers.RepeatedScalarFieldContainer[str]
    test_accuracy: float
    level: str
    num_classes: int
    def __init__(self, name: _Optional[str] = ..., class_names: _Optional[_Iterable[str]] = ..., test_accuracy: _Optional[float] = ..., level: _Optional[str] = ..., num_classes: _Optional[int] = ...) -> None: ...

class TokenizerInfo(_message.Message):
    __slots__ = ("file_name", "sha256", "vocab_size", "special_ids")
    class SpecialIdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_IDS_FIELD_NUMBER: _ClassVar[int]
    file_name: str
    sha256: str
    vocab_size: int
    special_ids: _containers.ScalarMap[str, int]
    def __init__(self, file_name: _Optional[str] = ..., sha256: _Optional[str] = ..., vocab_size: _Optional[int] = ..., special_ids: _Optional[_Mapping[str, int]] = ...) -> None: ...

class HintInfo(_message.Message):
    __slots__ = ("name", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "model_version", "tasks", "input_shape", "input_dtype", "accepted_input_dtypes", "uint8_scale", "hints", "max_batch_size", "description", "parameter_count", "input_kind", "max_length", "vocab_size", "max_batch_tokens", "tokenizer", "held_out_metrics")
    class HeldOutMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    INPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_INPUT_DTYPES_FIELD_NUMBER: _ClassVar[int]
    UINT8_SCALE_FIELD_NUMBER: _ClassVar[int]
    HINTS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    INPUT_KIND_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    HELD_OUT_METRICS_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_version: str
    tasks: _containers.RepeatedCompositeFieldContainer[TaskInfo]
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    input_dtype: DataType
    accepted_input_dtypes: _containers.RepeatedScalarFieldContainer[DataType]
    uint8_scale: float
    hints: _containers.RepeatedCompositeFieldContainer[HintInfo]
    max_batch_size: int
    description: str
    parameter_count: int
    input_kind: str
    max_length: int
    vocab_size: int
    max_batch_tokens: int
    tokenizer: TokenizerInfo
    held_out_metrics: _containers.ScalarMap[str, float]
    def __init__(self, name: _Optional[str] = ..., model_version: _Optional[str] = ..., tasks: _Optional[_Iterable[_Union[TaskInfo, _Mapping]]] = ..., input_shape: _Optional[_Iterable[int]] = ..., input_dtype: _Optional[_Union[DataType, str]] = ..., accepted_input_dtypes: _Optional[_Iterable[_Union[DataType, str]]] = ..., uint8_scale: _Optional[float] = ..., hints: _Optional[_Iterable[_Union[HintInfo, _Mapping]]] = ..., max_batch_size: _Optional[int] = ..., description: _Optional[str] = ..., parameter_count: _Optional[int] = ..., input_kind: _Optional[str] = ..., max_length: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., tokenizer: _Optional[_Union[TokenizerInfo, _Mapping]] = ..., held_out_metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class GetTokenizerRequest(_message.Message):
    __slots__ = ("model", "model_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class GetTokenizerResponse(_message.Message):
    __slots__ = ("file_name", "sha256", "content")
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    file_name: str
    sha256: str
    content: bytes
    def __init__(self, file_name: _Optional[str] = ..., sha256: _Optional[str] = ..., content: _Optional[bytes] = ...) -> None: ...

class SoftTargetsRequest(_message.Message):
    __slots__ = ("model", "model_version", "tasks", "temperature", "output", "inputs", "batch_id", "top_k", "output_dtype", "hints", "lengths", "scored_ids", "tokenizer_hash", "top_k_encoding")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    HINTS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    SCORED_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_HASH_FIELD_NUMBER: _ClassVar[int]
    TOP_K_ENCODING_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    tasks: _containers.RepeatedScalarFieldContainer[str]
    temperature: float
    output: OutputKind
    inputs: Tensor
    batch_id: str
    top_k: int
    output_dtype: DataType
    hints: _containers.RepeatedScalarFieldContainer[str]
    lengths: Tensor
    scored_ids: Tensor
    tokenizer_hash: str
    top_k_encoding: TopKEncoding
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., tasks: _Optional[_Iterable[str]] = ..., temperature: _Optional[float] = ..., output: _Optional[_Union[OutputKind, str]] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ..., batch_id: _Optional[str] = ..., top_k: _Optional[int] = ..., output_dtype: _Optional[_Union[DataType, str]] = ..., hints: _Optional[_Iterable[str]] = ..., lengths: _Optional[_Union[Tensor, _Mapping]] = ..., scored_ids: _Optional[_Union[Tensor, _Mapping]] = ..., tokenizer_hash: _Optional[str] = ..., top_k_encoding: _Optional[_Union[TopKEncoding, str]] = ...) -> None: ...

class TaskOutput(_message.Message):
    __slots__ = ("task", "kind", "values", "indices", "tail_mass", "level", "scored_values", "packed")
    TASK_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    TAIL_MASS_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    SCORED_VALUES_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    task: str
    kind: OutputKind
    values: Tensor
    indices: Tensor
    tail_mass: Tensor
    level: str
    scored_values: Tensor
    packed: PackedTopK
    def __init__(self, task: _Optional[str] = ..., kind: _Optional[_Union[OutputKind, str]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., indices: _Optional[_Union[Tensor, _Mapping]] = ..., tail_mass: _Optional[_Union[Tensor, _Mapping]] = ..., level: _Optional[str] = ..., scored_values: _Optional[_Union[Tensor, _Mapping]] = ..., packed: _Optional[_Union[PackedTopK, _Mapping]] = ...) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("name", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: Tensor
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SoftTargetsResponse(_message.Message):
    __slots__ = ("model", "model_version", "batch_id", "temperature", "outputs", "hints", "lengths")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    HINTS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    batch_id: str
    temperature: float
    outputs: _containers.RepeatedCompositeFieldContainer[TaskOutput]
    hints: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    lengths: Tensor
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., batch_id: _Optional[str] = ..., temperature: _Optional[float] = ..., outputs: _Optional[_Iterable[_Union[TaskOutput, _Mapping]]] = ..., hints: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., lengths: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "field")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    field: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., field: _Optional[str] = ...) -> None: ...

class StreamSoftTargetsResponse(_message.Message):
    __slots__ = ("batch_id", "soft_targets", "error")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    SOFT_TARGETS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    soft_targets: SoftTargetsResponse
    error: Error
    def __init__(self, batch_id: _Optional[str] = ..., soft_targets: _Optional[_Union[SoftTargetsResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...
