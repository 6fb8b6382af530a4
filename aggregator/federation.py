"""The federation's identity and starting point: its spec, created once with the initial model
checkpoint, and on every later start checked against the config and resumed from the last
committed checkpoint (model and outer optimizer state)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch
from google.protobuf import json_format

from aggregator.checkpoints import CheckpointStore, model_description
from aggregator.config import AggregatorConfig, AggregatorConfigError
from aggregator.outer import OuterConfigError, OuterOptimizer
from aggregator.state import RecoveryError
from aggregator.store import CheckpointRow, Store
from model.config import ModelConfig
from model.gpt import GPT
from model.io import model_state
from model.tokenizer import ByteTokenizer, load_tokenizer
from model.train_config import TrainConfig
from protos import federation_pb2 as pb

# Fields of the spec a restarted aggregator may not change under a running federation.
# chunk_bytes: spooled uploads are checked on restart by the root over their chunks' sha256s.
# inner_steps, train_config_json: nodes read them at Join, and certified nodes do not join
# again after a restart: they would go on training with the old ones.
# required_curation_sha256: checked only at Join, so for the same reason a new value would not
# reach the nodes already in, and the model would mix data curated both ways.
FROZEN_SPEC_FIELDS = ("model_config_json", "tokenizer_json", "outer_optimizer", "delta_encoding",
                      "download_encoding", "chunk_bytes", "inner_steps", "train_config_json",
                      "required_curation_sha256")  # fmt: skip


def build_spec(
    config: AggregatorConfig, model_config_json: str, tokenizer_spec: dict
) -> pb.FederationSpec:
    return pb.FederationSpec(
        name=config.federation.name,
        model_config_json=model_config_json,
        tokenizer_json=json.dumps(tokenizer_spec, sort_keys=True),
        train_config_json=json.dumps(config.train, sort_keys=True),
        inner_steps=config.federation.inner_steps,
        round_policy=pb.RoundPolicy(
            min_nodes=config.round.min_nodes,
            max_nodes=config.round.max_nodes,
            round_timeout_seconds=config.round.timeout_seconds,
        ),
        chunk_bytes=config.server.chunk_bytes,
        outer_optimizer=config.outer.name,
        total_rounds=config.federation.rounds,
        delta_encoding=config.delta_encoding,
        download_encoding=config.federation.download_encoding,
        required_curation_sha256=config.federation.require_curation,
    )


@dataclass
class Opened:
    federation_id: str
    spec: pb.FederationSpec
    model_config: ModelConfig
    params: dict[str, torch.Tensor]  # the last committed global model
    version: int
    outer: OuterOptimizer  # its state as committed with that version
    update_scale: tuple[float, ...] | None = None  # see state.GlobalModel


UPDATE_SCALE_KEY = "update_scale"  # checkpoint metadata: GlobalModel.update_scale as JSON


def update_scale_of(meta: dict) -> tuple[float, ...] | None:
    """The update scale a checkpoint's metadata records, if any."""
    raw = meta.get(UPDATE_SCALE_KEY)
    return tuple(float(x) for x in json.loads(raw)) if raw else None


def open_federation(
    config: AggregatorConfig,
    store: Store,
    checkpoints: CheckpointStore,
    *,
    clock: Callable[[], float],
    log: Callable[[str], None],
) -> Opened:
    """Create the federation named in `config`, or resume it; refuses a changed frozen field."""
    tokenizer_spec = (
        load_tokenizer({"kind": "bpe"}, config.federation.tokenizer).spec()
        if config.federation.tokenizer
        else ByteTokenizer().spec()
    )
    source = _initial_model(config.federation.init_from, tokenizer_spec)
    if source is None:
        model_config = config.model.with_vocab(tokenizer_spec["vocab_size"])
    else:
        model_config = source.config
    spec = build_spec(config, model_config.to_json(), tokenizer_spec)
    name = config.federation.name
    found = store.find_federation(name)
    if found is None:
        federation_id = str(uuid.uuid4())
        spec.federation_id = federation_id
        torch.manual_seed(config.federation.seed)
        if source is None:
            params = {k: v.detach().clone() for k, v in model_state(GPT(model_config)).items()}
        else:
            params = _checked_params(source)
            log(f"version 0 is {source.description}")
        outer = OuterOptimizer(config.outer, params)
        seq_len = TrainConfig.from_dict(config.train).seq_len
        described = model_description(spec.model_config_json, spec.tokenizer_json, seq_len)
        record = checkpoints.write(0, -1, params, outer.state_tensors(), outer.state_meta(),
                                   described)  # fmt: skip
        row = CheckpointRow(0, -1, str(record.path), record.sha256, record.nbytes, clock())
        store.create_federation(federation_id, name, _spec_json(spec), row)
        log(f"federation {name!r} created ({model_config.num_params() / 1e6:.2f}M params)")
        return Opened(federation_id, spec, model_config, params, 0, outer)
    federation_id, stored_json, _status = found
    spec.federation_id = federation_id
    stored = json_format.Parse(stored_json, pb.FederationSpec())
    changed = [f for f in FROZEN_SPEC_FIELDS if getattr(stored, f) != getattr(spec, f)]
    if changed:
        raise RecoveryError(
            f"federation {name!r} in {config.store.state_dir} was created with "
            f"another {', '.join(changed)}; use another name or state folder"
        )
    row = store.latest_checkpoint(federation_id)
    for path in checkpoints.remove_newer_than(row.version):
        log(f"recovery: removed uncommitted checkpoint {path}")
    params, outer_tensors, meta = checkpoints.read(row.version, expected_sha256=row.sha256)
    outer = OuterOptimizer(config.outer, params)
    try:
        outer.load_state(outer_tensors, meta["outer"])
    except OuterConfigError as e:
        raise RecoveryError(
            f"cannot resume the outer optimizer with this [outer] config: {e}"
        ) from e
    log(f"federation {name!r} resumed at model version {row.version}")
    return Opened(federation_id, spec, model_config, params, row.version, outer,
                  update_scale_of(meta))  # fmt: skip


def _spec_json(spec: pb.FederationSpec) -> str:
    return json.dumps(
        json_format.MessageToDict(spec, preserving_proto_field_name=True), sort_keys=True
    )


def _initial_model(init_from: str, tokenizer_spec: dict):
    """The model `[federation] init_from` names (node/model_source.py), checked against the
    federation's tokenizer; None when it names none."""
    if not init_from:
        return None
    from model.io import CheckpointError
    from node.model_source import locate

    try:
        source = locate(init_from)
    except CheckpointError as e:
        raise AggregatorConfigError(f"[federation] init_from: {e}") from e
    mine = {k: v for k, v in source.tokenizer_spec.items() if k != "vocab_size"}
    theirs = {k: v for k, v in tokenizer_spec.items() if k != "vocab_size"}
    if mine and mine != theirs:
        raise AggregatorConfigError(
            f"[federation] init_from: {source.description} was trained with tokenizer "
            f"{json.dumps(source.tokenizer_spec)}, but the federation's is "
            f"{json.dumps(tokenizer_spec)} (set [federation] tokenizer to its tokenizer.json)"
        )
    if tokenizer_spec["vocab_size"] > source.config.vocab_size:
        raise AggregatorConfigError("[federation] init_from: the tokenizer's vocabulary is larger "
                                    "than the model's")  # fmt: skip
    return source


def _checked_params(source) -> dict[str, torch.Tensor]:
    """The source's weights in the model's own tensor order, every name and shape checked."""
    with torch.device("meta"):
        expected = model_state(GPT(source.config))
    state = source.state()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise AggregatorConfigError(f"[federation] init_from: {source.description} lacks "
                                    f"{missing[:3]} or has extra {extra[:3]}")  # fmt: skip
    for name, want in expected.items():
        if tuple(state[name].shape) != tuple(want.shape):
            raise AggregatorConfigError(f"[federation] init_from: {name} has shape "
                                        f"{tuple(state[name].shape)}, not {tuple(want.shape)}")  # fmt: skip
    return {name: state[name].to(torch.float32).contiguous() for name in expected}
