from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Capabilities(_message.Message):
    __slots__ = ("num_devices", "device_kind", "fedpt_version")
    NUM_DEVICES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_KIND_FIELD_NUMBER: _ClassVar[int]
    FEDPT_VERSION_FIELD_NUMBER: _ClassVar[int]
    num_devices: int
    device_kind: str
    fedpt_version: str
    def __init__(self, num_devices: _Optional[int] = ..., device_kind: _Optional[str] = ..., fedpt_version: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("organisation", "capabilities", "admission_token", "curation")
    ORGANISATION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    ADMISSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CURATION_FIELD_NUMBER: _ClassVar[int]
    organisation: str
    capabilities: Capabilities
    admission_token: str
    curation: DataCuration
    def __init__(self, organisation: _Optional[str] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., admission_token: _Optional[str] = ..., curation: _Optional[_Union[DataCuration, _Mapping]] = ...) -> None: ...

class DataCuration(_message.Message):
    __slots__ = ("sha256", "documents_in", "documents_kept", "removed")
    class RemovedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_IN_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_KEPT_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    documents_in: int
    documents_kept: int
    removed: _containers.ScalarMap[str, int]
    def __init__(self, sha256: _Optional[str] = ..., documents_in: _Optional[int] = ..., documents_kept: _Optional[int] = ..., removed: _Optional[_Mapping[str, int]] = ...) -> None: ...

class RoundPolicy(_message.Message):
    __slots__ = ("min_nodes", "max_nodes", "round_timeout_seconds")
    MIN_NODES_FIELD_NUMBER: _ClassVar[int]
    MAX_NODES_FIELD_NUMBER: _ClassVar[int]
    ROUND_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    min_nodes: int
    max_nodes: int
    round_timeout_seconds: float
    def __init__(self, min_nodes: _Optional[int] = ..., max_nodes: _Optional[int] = ..., round_timeout_seconds: _Optional[float] = ...) -> None: ...

class FederationSpec(_message.Message):
    __slots__ = ("federation_id", "name", "model_config_json", "tokenizer_json", "train_config_json", "inner_steps", "round_policy", "chunk_bytes", "outer_optimizer", "total_rounds", "delta_encoding", "download_encoding", "required_curation_sha256")
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    TRAIN_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    INNER_STEPS_FIELD_NUMBER: _ClassVar[int]
    ROUND_POLICY_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    OUTER_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    DELTA_ENCODING_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_ENCODING_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_CURATION_SHA256_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    name: str
    model_config_json: str
    tokenizer_json: str
    train_config_json: str
    inner_steps: int
    round_policy: RoundPolicy
    chunk_bytes: int
    outer_optimizer: str
    total_rounds: int
    delta_encoding: str
    download_encoding: str
    required_curation_sha256: str
    def __init__(self, federation_id: _Optional[str] = ..., name: _Optional[str] = ..., model_config_json: _Optional[str] = ..., tokenizer_json: _Optional[str] = ..., train_config_json: _Optional[str] = ..., inner_steps: _Optional[int] = ..., round_policy: _Optional[_Union[RoundPolicy, _Mapping]] = ..., chunk_bytes: _Optional[int] = ..., outer_optimizer: _Optional[str] = ..., total_rounds: _Optional[int] = ..., delta_encoding: _Optional[str] = ..., download_encoding: _Optional[str] = ..., required_curation_sha256: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("node_id", "session_token", "spec")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    session_token: str
    spec: FederationSpec
    def __init__(self, node_id: _Optional[str] = ..., session_token: _Optional[str] = ..., spec: _Optional[_Union[FederationSpec, _Mapping]] = ...) -> None: ...

class TaskRequest(_message.Message):
    __slots__ = ("wait_seconds", "final_model")
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FINAL_MODEL_FIELD_NUMBER: _ClassVar[int]
    wait_seconds: float
    final_model: bool
    def __init__(self, wait_seconds: _Optional[float] = ..., final_model: _Optional[bool] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("kind", "round", "model_version", "deadline_unix", "retry_after_seconds", "message")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Task.Kind]
        WAIT: _ClassVar[Task.Kind]
        TRAIN: _ClassVar[Task.Kind]
        STOP: _ClassVar[Task.Kind]
        SECAGG_ADVERTISE_KEYS: _ClassVar[Task.Kind]
        SECAGG_SHARE_KEYS: _ClassVar[Task.Kind]
        SECAGG_UNMASK: _ClassVar[Task.Kind]
    KIND_UNSPECIFIED: Task.Kind
    WAIT: Task.Kind
    TRAIN: Task.Kind
    STOP: Task.Kind
    SECAGG_ADVERTISE_KEYS: Task.Kind
    SECAGG_SHARE_KEYS: Task.Kind
    SECAGG_UNMASK: Task.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    kind: Task.Kind
    round: int
    model_version: int
    deadline_unix: float
    retry_after_seconds: float
    message: str
    def __init__(self, kind: _Optional[_Union[Task.Kind, str]] = ..., round: _Optional[int] = ..., model_version: _Optional[int] = ..., deadline_unix: _Optional[float] = ..., retry_after_seconds: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class TensorEntry(_message.Message):
    __slots__ = ("name", "shape", "dtype", "offset", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    offset: int
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class TensorManifest(_message.Message):
    __slots__ = ("tensors", "chunk_bytes", "total_bytes", "chunk_sha256", "sha256", "model_sha256")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SHA256_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorEntry]
    chunk_bytes: int
    total_bytes: int
    chunk_sha256: _containers.RepeatedScalarFieldContainer[bytes]
    sha256: bytes
    model_sha256: bytes
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorEntry, _Mapping]]] = ..., chunk_bytes: _Optional[int] = ..., total_bytes: _Optional[int] = ..., chunk_sha256: _Optional[_Iterable[bytes]] = ..., sha256: _Optional[bytes] = ..., model_sha256: _Optional[bytes] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("index", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("model_version", "first_chunk", "from_previous")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FIRST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    FROM_PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    first_chunk: int
    from_previous: bool
    def __init__(self, model_version: _Optional[int] = ..., first_chunk: _Optional[int] = ..., from_previous: _Optional[bool] = ...) -> None: ...

class ModelStreamMessage(_message.Message):
    __slots__ = ("manifest", "chunk")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    manifest: TensorManifest
    chunk: Chunk
    def __init__(self, manifest: _Optional[_Union[TensorManifest, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("round", "base_version", "manifest", "num_tokens", "train_loss", "first_chunk", "base_val_loss", "gpu_energy_joules", "cpu_energy_joules")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    FIRST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    BASE_VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    GPU_ENERGY_JOULES_FIELD_NUMBER: _ClassVar[int]
    CPU_ENERGY_JOULES_FIELD_NUMBER: _ClassVar[int]
    round: int
    base_version: int
    manifest: TensorManifest
    num_tokens: int
    train_loss: float
    first_chunk: int
    base_val_loss: float
    gpu_energy_joules: float
    cpu_energy_joules: float
    def __init__(self, round: _Optional[int] = ..., base_version: _Optional[int] = ..., manifest: _Optional[_Union[TensorManifest, _Mapping]] = ..., num_tokens: _Optional[int] = ..., train_loss: _Optional[float] = ..., first_chunk: _Optional[int] = ..., base_val_loss: _Optional[float] = ..., gpu_energy_joules: _Optional[float] = ..., cpu_energy_joules: _Optional[float] = ...) -> None: ...

class UpdateMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("chunks_received", "complete")
    CHUNKS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    chunks_received: int
    complete: bool
    def __init__(self, chunks_received: _Optional[int] = ..., complete: _Optional[bool] = ...) -> None: ...

class UploadStatusRequest(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class UploadStatus(_message.Message):
    __slots__ = ("chunks_received", "complete")
    CHUNKS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    chunks_received: int
    complete: bool
    def __init__(self, chunks_received: _Optional[int] = ..., complete: _Optional[bool] = ...) -> None: ...

class SignedKeys(_message.Message):
    __slots__ = ("node_id", "cipher_public", "mask_public", "signature")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHER_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    cipher_public: bytes
    mask_public: bytes
    signature: bytes
    def __init__(self, node_id: _Optional[str] = ..., cipher_public: _Optional[bytes] = ..., mask_public: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class AdvertiseKeysRequest(_message.Message):
    __slots__ = ("round", "keys")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    round: int
    keys: SignedKeys
    def __init__(self, round: _Optional[int] = ..., keys: _Optional[_Union[SignedKeys, _Mapping]] = ...) -> None: ...

class EncryptedShare(_message.Message):
    __slots__ = ("sender", "recipient", "ciphertext")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    sender: str
    recipient: str
    ciphertext: bytes
    def __init__(self, sender: _Optional[str] = ..., recipient: _Optional[str] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class ShareKeysRequest(_message.Message):
    __slots__ = ("round", "shares")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    round: int
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShare]
    def __init__(self, round: _Optional[int] = ..., shares: _Optional[_Iterable[_Union[EncryptedShare, _Mapping]]] = ...) -> None: ...

class SecAggStateRequest(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class PeerKeys(_message.Message):
    __slots__ = ("keys", "certificate_pem", "share_index")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    SHARE_INDEX_FIELD_NUMBER: _ClassVar[int]
    keys: SignedKeys
    certificate_pem: bytes
    share_index: int
    def __init__(self, keys: _Optional[_Union[SignedKeys, _Mapping]] = ..., certificate_pem: _Optional[bytes] = ..., share_index: _Optional[int] = ...) -> None: ...

class SecAggParams(_message.Message):
    __slots__ = ("clip", "scale", "threshold", "weight_unit", "tensor_clip", "tensor_scale", "ring_bits")
    CLIP_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_UNIT_FIELD_NUMBER: _ClassVar[int]
    TENSOR_CLIP_FIELD_NUMBER: _ClassVar[int]
    TENSOR_SCALE_FIELD_NUMBER: _ClassVar[int]
    RING_BITS_FIELD_NUMBER: _ClassVar[int]
    clip: float
    scale: float
    threshold: int
    weight_unit: float
    tensor_clip: _containers.RepeatedScalarFieldContainer[float]
    tensor_scale: _containers.RepeatedScalarFieldContainer[float]
    ring_bits: int
    def __init__(self, clip: _Optional[float] = ..., scale: _Optional[float] = ..., threshold: _Optional[int] = ..., weight_unit: _Optional[float] = ..., tensor_clip: _Optional[_Iterable[float]] = ..., tensor_scale: _Optional[_Iterable[float]] = ..., ring_bits: _Optional[int] = ...) -> None: ...

class SecAggState(_message.Message):
    __slots__ = ("round", "peers", "shares_for_me", "share_holders", "survivors", "dropped", "params")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    SHARES_FOR_ME_FIELD_NUMBER: _ClassVar[int]
    SHARE_HOLDERS_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    round: int
    peers: _containers.RepeatedCompositeFieldContainer[PeerKeys]
    shares_for_me: _containers.RepeatedCompositeFieldContainer[EncryptedShare]
    share_holders: _containers.RepeatedScalarFieldContainer[str]
    survivors: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    params: SecAggParams
    def __init__(self, round: _Optional[int] = ..., peers: _Optional[_Iterable[_Union[PeerKeys, _Mapping]]] = ..., shares_for_me: _Optional[_Iterable[_Union[EncryptedShare, _Mapping]]] = ..., share_holders: _Optional[_Iterable[str]] = ..., survivors: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ..., params: _Optional[_Union[SecAggParams, _Mapping]] = ...) -> None: ...

class RevealedShare(_message.Message):
    __slots__ = ("about_node", "share")
    ABOUT_NODE_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    about_node: str
    share: bytes
    def __init__(self, about_node: _Optional[str] = ..., share: _Optional[bytes] = ...) -> None: ...

class UnmaskRequest(_message.Message):
    __slots__ = ("round", "self_seed_shares", "mask_key_shares")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SELF_SEED_SHARES_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    round: int
    self_seed_shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    mask_key_shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    def __init__(self, round: _Optional[int] = ..., self_seed_shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ..., mask_key_shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ...) -> None: ...

class StageAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FederationStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "organisation", "joined_at", "last_record", "last_call", "doing", "uploaded_bytes", "downloaded_bytes", "upload_in_flight_bytes", "last_loss", "tokens", "energy_joules", "measured_tokens")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ORGANISATION_FIELD_NUMBER: _ClassVar[int]
    JOINED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_RECORD_FIELD_NUMBER: _ClassVar[int]
    LAST_CALL_FIELD_NUMBER: _ClassVar[int]
    DOING_FIELD_NUMBER: _ClassVar[int]
    UPLOADED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DOWNLOADED_BYTES_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_IN_FLIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAST_LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_JOULES_FIELD_NUMBER: _ClassVar[int]
    MEASURED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    organisation: str
    joined_at: float
    last_record: float
    last_call: float
    doing: str
    uploaded_bytes: int
    downloaded_bytes: int
    upload_in_flight_bytes: int
    last_loss: float
    tokens: int
    energy_joules: float
    measured_tokens: int
    def __init__(self, node_id: _Optional[str] = ..., organisation: _Optional[str] = ..., joined_at: _Optional[float] = ..., last_record: _Optional[float] = ..., last_call: _Optional[float] = ..., doing: _Optional[str] = ..., uploaded_bytes: _Optional[int] = ..., downloaded_bytes: _Optional[int] = ..., upload_in_flight_bytes: _Optional[int] = ..., last_loss: _Optional[float] = ..., tokens: _Optional[int] = ..., energy_joules: _Optional[float] = ..., measured_tokens: _Optional[int] = ...) -> None: ...

class FederationStatus(_message.Message):
    __slots__ = ("name", "status", "model_version", "total_rounds", "round", "round_state", "round_started", "round_deadline", "committed", "failed", "rounds_per_hour", "eta_seconds", "last_outcome", "nodes", "as_of", "live")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUND_STATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_STARTED_FIELD_NUMBER: _ClassVar[int]
    ROUND_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_OUTCOME_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    name: str
    status: str
    model_version: int
    total_rounds: int
    round: int
    round_state: str
    round_started: float
    round_deadline: float
    committed: int
    failed: int
    rounds_per_hour: float
    eta_seconds: float
    last_outcome: str
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    as_of: float
    live: bool
    def __init__(self, name: _Optional[str] = ..., status: _Optional[str] = ..., model_version: _Optional[int] = ..., total_rounds: _Optional[int] = ..., round: _Optional[int] = ..., round_state: _Optional[str] = ..., round_started: _Optional[float] = ..., round_deadline: _Optional[float] = ..., committed: _Optional[int] = ..., failed: _Optional[int] = ..., rounds_per_hour: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., last_outcome: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ..., as_of: _Optional[float] = ..., live: _Optional[bool] = ...) -> None: ...
