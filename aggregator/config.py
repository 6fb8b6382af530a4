"""`aggregator.toml`: typed sections, unknown keys are an error, flags override.

[server]      where and how the gRPC service listens
[federation]  what is trained: name, rounds, H inner steps, seed, delta encoding, the data
              curation nodes must have applied
[model]       preset = "tiny" plus any ModelConfig field
[train]       the nodes' inner-loop TrainConfig fields (sent to every node at Join)
[round]       quorum, participants per round, deadline
[outer]       outer optimizer: name = "fedavg" | "nesterov" | "adam", lr, momentum, betas, eps
[store]       state folder (checkpoints, uploads) and database URL
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from aggregator.memory import MAX_MMAP_THRESHOLD_BYTES
from aggregator.outer import OuterConfig, OuterConfigError
from model.config import ConfigError, ModelConfig, dataclass_from_dict, preset
from model.train_config import TrainConfig, TrainConfigError
from protos.delta_encoding import (
    ENCODINGS,
    PLAIN_ENCODINGS,
    RING_BITS,
    EncodingError,
    check_chunk_bytes,
    is_secure,
)

# The encodings "auto" picks, from `bench.convergence --encodings` (4 nodes × 6 rounds, tiny):
# held-out perplexity within 0.2% of fp32 at a half (masked-int16) and a quarter (int8) of the
# bytes; masked-int8 cost 0.6% and caps a federation at 63 nodes. See the README.
AUTO_SECURE = "masked-int16"
AUTO_PLAIN = "int8"


class AggregatorConfigError(ValueError):
    """aggregator.toml or a flag is invalid; the message names the section and key."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 7450
    max_workers: int = 256  # gRPC handler threads; each long-polling node holds one: ≥ nodes + 16
    long_poll_seconds: float = 10.0  # upper bound on how long GetTask holds a call
    chunk_bytes: int = 4 << 20
    max_message_bytes: int = 16 << 20  # a larger request is refused, RESOURCE_EXHAUSTED
    # HTTP/2 receive window per upload stream. gRPC's adaptive window lets each of N uploaders
    # run far ahead of the (serial) accumulation, so memory grew with N; a fixed window bounds it
    # to N × this, while 8 MiB still fills a 100 ms, 80 MB/s path. 0: gRPC's adaptive window.
    stream_window_bytes: int = 8 << 20
    # After the last round, stay up until every node has seen STOP, at most this long: longer
    # than a node's reconnect back-off (10 s) plus a long poll, so a node away then still hears it.
    stop_linger_seconds: float = 30.0
    # One node's calls in flight (aggregator/limits.py): more are refused, RESOURCE_EXHAUSTED;
    # and its GetTask calls that may wait at once (more are answered without waiting). 0: no limit.
    max_calls_per_node: int = 16
    max_long_polls_per_node: int = 2
    # HTTP/2 header block of one call (all its metadata): grpc refuses a larger one, and drops
    # the connection of a header block (e.g. a flood of CONTINUATION frames) past twice this.
    # fedpt's own metadata is one session token; 0: grpc's defaults (8 KiB, 16 KiB).
    max_metadata_bytes: int = 4 << 10
    # glibc malloc of the aggregator process (aggregator/memory.py): its arenas (0: glibc's, 8
    # per core), its mmap threshold (fixed; 0: glibc's dynamic one), and how often free heap
    # memory is given back to the system (0: never). All three are needed for the last.
    malloc_arenas: int = 1
    malloc_mmap_threshold_bytes: int = MAX_MMAP_THRESHOLD_BYTES
    malloc_trim_seconds: float = 60.0
    kit: str = ""  # the aggregator's startup kit (`fedpt ca issue --server-host ...`): mutual TLS
    insecure: bool = False  # plain text, identity by session token: trusted networks and tests only
    # Prometheus metrics (aggregator/metrics.py) at http://host:metrics_port/metrics; 0: off.
    metrics_port: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise AggregatorConfigError(f"[server] port {self.port} is not a TCP port")
        if not 0 <= self.metrics_port < 65536:
            raise AggregatorConfigError(
                f"[server] metrics_port {self.metrics_port} is not a TCP port (0: no metrics)"
            )
        if self.metrics_port and self.metrics_port == self.port:
            raise AggregatorConfigError("[server] metrics_port must differ from port")
        if self.max_workers < 4:
            raise AggregatorConfigError("[server] max_workers must be at least 4")
        if self.long_poll_seconds <= 0:
            raise AggregatorConfigError("[server] long_poll_seconds must be positive")
        if not (self.max_metadata_bytes == 0 or 1024 <= self.max_metadata_bytes <= 1 << 20):
            raise AggregatorConfigError(
                "[server] max_metadata_bytes must be 0 (grpc's defaults) or 1 KiB..1 MiB"
            )
        if not 0 <= self.malloc_arenas <= 64:
            raise AggregatorConfigError(
                "[server] malloc_arenas must be in 0..64 (0: glibc's default)"
            )
        if not (0 <= self.malloc_mmap_threshold_bytes <= MAX_MMAP_THRESHOLD_BYTES):
            raise AggregatorConfigError(
                "[server] malloc_mmap_threshold_bytes must be in 0..32 MiB (0: glibc's dynamic one)"
            )
        if not 0 <= self.malloc_trim_seconds <= 86400:
            raise AggregatorConfigError(
                "[server] malloc_trim_seconds must be in 0..86400 (0: never)"
            )
        if self.max_calls_per_node < 0 or self.max_long_polls_per_node < 0:
            raise AggregatorConfigError(
                "[server] max_calls_per_node and max_long_polls_per_node must be ≥ 0 (0: no limit)"
            )
        if not 0 <= self.stop_linger_seconds <= 3600:
            raise AggregatorConfigError("[server] stop_linger_seconds must be in 0..3600")
        if self.chunk_bytes <= 0 or self.chunk_bytes % 4 or self.chunk_bytes > 64 << 20:
            raise AggregatorConfigError(
                "[server] chunk_bytes must be a positive multiple of 4, ≤ 64 MiB"
            )
        if self.max_message_bytes < self.chunk_bytes + (1 << 20):
            raise AggregatorConfigError(
                "[server] max_message_bytes must exceed chunk_bytes by 1 MiB"
            )
        if not self.kit and not self.insecure:
            raise AggregatorConfigError(
                "[server] needs kit = <startup kit folder> for mutual TLS, or insecure = true"
            )


@dataclass(frozen=True)
class FederationConfig:
    name: str = "fedpt"
    rounds: int = 10  # rounds to commit before the federation ends; 0: until stopped
    inner_steps: int = 50  # H
    seed: int = 0  # initial global model
    tokenizer: str = ""  # BPE tokenizer JSON (nodes need the same file); empty: byte-level
    # Version 0 is this model instead of a random one (continual pretraining): a fedpt weights
    # file or run, a global checkpoint, or a transformers Llama folder; its shape replaces [model].
    init_from: str = ""
    # How node updates travel (protos/delta_encoding.py): plain fp32 | bf16 | int8, or secure
    # aggregation masked-int32 | masked-int16 | masked-int8. auto: AUTO_SECURE (masked-int16)
    # with mutual TLS, AUTO_PLAIN (int8) without.
    delta_encoding: str = "auto"
    # How nodes holding the previous version receive the next: fp32 = the whole model; bf16 or
    # int8 = the compressed outer update, which then defines the new model (aggregator/downloads.py).
    download_encoding: str = "int8"
    # Join refuses nodes whose shards were not curated with this configuration: its sha256
    # (node/curation_config.py), as a curated shard folder's train/manifest.json records it
    # ("curation": {"sha256": ...}). Empty: any data, curated or not.
    require_curation: str = ""

    def __post_init__(self) -> None:
        if self.require_curation and not is_sha256(self.require_curation):
            raise AggregatorConfigError(
                "[federation] require_curation must be a curation configuration's sha256 "
                f"(64 lowercase hex digits) or empty, not {self.require_curation[:80]!r}"
            )
        if not self.name or len(self.name) > 100:
            raise AggregatorConfigError("[federation] name must be 1 to 100 characters")
        if self.rounds < 0 or self.inner_steps <= 0:
            raise AggregatorConfigError("[federation] rounds must be ≥ 0 and inner_steps > 0")
        if self.delta_encoding not in ("auto", *ENCODINGS):
            raise AggregatorConfigError(
                f"[federation] delta_encoding must be auto, {', '.join(ENCODINGS)}"
            )
        if self.download_encoding not in PLAIN_ENCODINGS:
            raise AggregatorConfigError(
                f"[federation] download_encoding must be one of {', '.join(PLAIN_ENCODINGS)}"
            )


def is_sha256(text: str) -> bool:
    """64 lowercase hex digits, as hashlib's hexdigest() writes them."""
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


@dataclass(frozen=True)
class RoundConfig:
    min_nodes: int = 2  # quorum
    max_nodes: int = 0  # 0: every ready node takes part
    timeout_seconds: float = 600.0  # upload deadline, from the round's start
    start_grace_seconds: float = 1.0  # once a quorum is ready, wait this long for more nodes
    # Sum fp32 uploads in node order when aggregating (re-reading the spooled uploads), so the
    # new model does not depend on the order uploads arrived in (float addition is not
    # associative). Secure aggregation's modular sum is exact in any order without it.
    deterministic: bool = False

    def __post_init__(self) -> None:
        if self.min_nodes < 1:
            raise AggregatorConfigError("[round] min_nodes must be at least 1")
        if self.max_nodes and self.max_nodes < self.min_nodes:
            raise AggregatorConfigError("[round] max_nodes must be 0 or ≥ min_nodes")
        if self.timeout_seconds <= 0 or self.start_grace_seconds < 0:
            raise AggregatorConfigError(
                "[round] timeout_seconds must be > 0, start_grace_seconds ≥ 0"
            )


@dataclass(frozen=True)
class SecAggConfig:
    # Public bound on each element of a node's weighted update (Δ + residual) · weight, per
    # tensor. Until a round has committed, `clip` for every tensor; then, with clip_rms_multiple
    # > 0, that multiple of the RMS of each tensor of the last committed mean update (public:
    # the aggregator learns the mean anyway), which keeps a narrow ring's steps fine. Clipped
    # mass is not lost: each node carries it to its next update (error feedback).
    clip: float = 1.0
    clip_rms_multiple: float = 8.0
    threshold: int = 0  # Shamir threshold t; 0: ceil(2n/3) of the nodes that advertised keys
    stage_timeout_seconds: float = 120.0  # deadline of each key / unmask stage

    def __post_init__(self) -> None:
        if (
            not (self.clip > 0 and self.clip < 1e6)
            or not 0 <= self.clip_rms_multiple < 1e6
            or self.threshold < 0
            or self.stage_timeout_seconds <= 0
        ):
            raise AggregatorConfigError(
                "[secagg] clip must be in (0, 1e6), clip_rms_multiple in [0, 1e6), "
                "threshold ≥ 0, stage_timeout_seconds > 0"
            )


@dataclass(frozen=True)
class StoreConfig:
    state_dir: str = "aggregator-state"
    database_url: str = ""  # empty: sqlite file inside state_dir
    keep_checkpoints: int = 5  # older committed checkpoints are pruned (0: keep all)

    def resolved_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{Path(self.state_dir).resolve() / 'fedpt.db'}"


@dataclass(frozen=True)
class AggregatorConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    model: ModelConfig = field(default_factory=lambda: preset("tiny"))
    train: dict = field(default_factory=dict)  # TrainConfig fields for the nodes, checked by them
    round: RoundConfig = field(default_factory=RoundConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)

    def __post_init__(self) -> None:
        encoding = self.delta_encoding
        if is_secure(encoding) and self.server.insecure:
            raise AggregatorConfigError(
                f"secure aggregation ({encoding}) needs mutual TLS: the nodes sign their round "
                "keys with the identity keys their certificates vouch for"
            )
        try:
            check_chunk_bytes(encoding, self.server.chunk_bytes)
            check_chunk_bytes(self.federation.download_encoding, self.server.chunk_bytes)
        except EncodingError as e:
            raise AggregatorConfigError(f"[server] {e}") from e
        if is_secure(encoding):
            bits = RING_BITS[encoding]
            most = self.round.max_nodes or self.round.min_nodes
            if most * 2 >= 2 ** (bits - 1):
                raise AggregatorConfigError(
                    f"a {bits}-bit ring cannot hold the sum of {most} nodes' updates: "
                    "use a wider delta_encoding or fewer [round] max_nodes"
                )

    @property
    def delta_encoding(self) -> str:
        """The encoding in force: secure aggregation needs identity keys, hence mutual TLS."""
        chosen = self.federation.delta_encoding
        if chosen == "auto":
            return AUTO_PLAIN if self.server.insecure else AUTO_SECURE
        return chosen


SECTIONS = ("server", "federation", "model", "train", "round", "outer", "store", "secagg")


def config_from_dict(raw: dict) -> AggregatorConfig:
    """Build the config from parsed TOML; every error names its section and key."""
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise AggregatorConfigError(
            f"unknown sections {', '.join(unknown)}; expected {', '.join(SECTIONS)}"
        )
    for name in SECTIONS:
        if not isinstance(raw.get(name, {}), dict):
            raise AggregatorConfigError(f"[{name}] must be a table")
    if raw.get("model") and dict(raw.get("federation", {})).get("init_from"):
        raise AggregatorConfigError(
            "[federation] init_from names the model, and so do [model] or --preset: drop one"
        )
    try:
        model_table = dict(raw.get("model", {}))
        base = preset(model_table.pop("preset", "tiny"))
        return AggregatorConfig(
            server=_section(ServerConfig, raw, "server"),
            federation=_section(FederationConfig, raw, "federation"),
            model=ModelConfig.from_dict({**base.to_dict(), **model_table}),
            train=_checked_train(dict(raw.get("train", {}))),
            round=_section(RoundConfig, raw, "round"),
            outer=_section(OuterConfig, raw, "outer"),
            store=_section(StoreConfig, raw, "store"),
            secagg=_section(SecAggConfig, raw, "secagg"),
        )
    except (ConfigError, OuterConfigError) as e:
        raise AggregatorConfigError(str(e)) from e


def _section(cls: type, raw: dict, name: str):
    return dataclass_from_dict(cls, dict(raw.get(name, {})), f"[{name}]", AggregatorConfigError)


def _checked_train(table: dict) -> dict:
    # The aggregator never trains, but a typo here would only surface on every node: check now.
    try:
        TrainConfig.from_dict(table)
    except TrainConfigError as e:
        raise AggregatorConfigError(f"[train] {e}") from e
    return table


def load_config(path: Path | None, overrides: dict[str, dict] | None = None) -> AggregatorConfig:
    """Read `path` (None: all defaults) and apply `overrides` ({section: {key: value}})."""
    raw: dict = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except OSError as e:
            raise AggregatorConfigError(f"cannot read {path}: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise AggregatorConfigError(f"{path} is not valid TOML: {e}") from e
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)


def replace_section(config: AggregatorConfig, **sections) -> AggregatorConfig:
    return dataclasses.replace(config, **sections)
