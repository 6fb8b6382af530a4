"""The participant: one organisation's node in a federation.

    join ─► long-poll a task ─► pull θ_global (resumable) ─► train H inner steps on private shards
         ▲                                                          │
         └──── push Δ = θ_global − θ_local (resumable) ◄────────────┘     until STOP

Only weights and deltas leave this process; the corpus, its tokens and the inner optimizer state
stay here. With several local ranks (torchrun), rank 0 does all network I/O and the others wait
in a broadcast for the task and the global weights. While the aggregator is away the node
reconnects with exponential backoff, for up to `reconnect_timeout_seconds`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from model.config import ConfigError, ModelConfig, dataclass_from_dict
from model.delta import pseudo_gradient
from model.gpt import GPT
from model.io import (
    load_weights_into,
    map_float32_tensors,
    model_state,
    save_model,
    save_tensors_atomic,
    write_json_atomic,
)
from model.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from model.train_config import TrainConfig
from node.checkpoint import latest_checkpoint, prune_checkpoints
from node.client import AggregatorClient
from node.curation_config import CurationConfig, load_curation_config
from node.energy import POWERCAP_ROOT, EnergyMeter, RoundEnergy
from node.local_training import cache_dir, curated_source, load_splits, open_tokenizer
from node.metrics import MetricsLog
from node.parallel import DistEnv, Launch, barrier, broadcast_bytes, broadcast_tensors
from node.personalise import (
    PersonaliseConfig,
    PersonaliseError,
    loss_text,
    personalise,
    validation_loss,
)
from node.progress import transfer_bar
from node.prometheus import NodeMetrics
from node.round_order import ModelMismatch, RoundOrder
from node.secure_aggregation import NodeSecAgg, SecAggRefused
from node.shards import (
    MANIFEST_NAME,
    prepare_data,
    shard_curation,
)
from node.trainer import Trainer
from protos import crash_points, pki
from protos import federation_pb2 as pb
from protos.codec import DEFAULT_CHUNK_BYTES, EncodedPayload, SpooledPayload, TensorSpec, specs_of
from protos.curation import NO_CURATION
from protos.delta_encoding import encode_update, is_secure, plain_rounding_key

SECAGG_STAGES = (pb.Task.SECAGG_ADVERTISE_KEYS, pb.Task.SECAGG_SHARE_KEYS, pb.Task.SECAGG_UNMASK)
RECONNECT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# Refusals after which the node simply asks for its next task.
SKIP_ROUND_CODES = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS,
                    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND)  # fmt: skip


class NodeConfigError(ValueError):
    """node.toml or a flag is invalid."""


class FederationMismatch(RuntimeError):
    """This node cannot take part: its tokenizer or data does not fit the federation's spec."""


class AggregatorUnreachable(RuntimeError):
    """The aggregator refused this node's TLS handshake, or stayed away past the reconnect
    timeout: one line for the operator instead of a gRPC traceback."""


class AggregatorAway(AggregatorUnreachable):
    """The aggregator stayed unreachable past the reconnect timeout (after the federation's
    last round, the node finishes instead)."""


# What grpc's details say when TLS fails, as opposed to a network that is down: retrying
# cannot help (another CA, a revoked or foreign kit, an aggregator kit used as a node's).
_HANDSHAKE_FAILURE = ("handshake failed", "ssl_error", "certificate_verify_failed", "tsi_")


def handshake_failed(error: grpc.RpcError) -> bool:
    details = (error.details() or "").lower()
    return error.code() == grpc.StatusCode.UNAVAILABLE and any(
        marker in details for marker in _HANDSHAKE_FAILURE
    )


@dataclass(frozen=True)
class NodeConfig:
    aggregator: str = "127.0.0.1:7450"
    organisation: str = ""  # default: the data source's name
    data: str = ""  # folder / file / prepared shards / builtin[:ORG]
    tokenizer: str = ""  # the federation's BPE JSON when it uses one (checked by sha256)
    # A TOML with a [curation] table (node/curation_config.py): the corpus is curated with it
    # before packing; only the curation's sha256 and counts leave the node.
    curation: str = ""
    work_dir: str = "fedpt-node"  # metrics, round log, optional deltas
    # Ranks and hosts (node.parallel.Launch): an organisation's node may span several hosts.
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int | None = None  # host 0 holds global rank 0, the one that talks to the aggregator
    rdzv_endpoint: str = ""  # HOST:PORT on host 0
    reset_inner_optimizer: bool = False  # default: AdamW moments carry over between rounds
    # Zero only AdamW's first moment at each round: its second moment (the scale of each
    # weight's gradients) carries over, the direction of the last round does not.
    reset_inner_momentum: bool = False
    # Score each global model pulled on the private validation split and send the scalar with
    # the update: the aggregator keeps it per organisation and round.
    score_global: bool = True
    # When the federation ends: the final global model adapted on this node's private data for
    # this many steps (node/personalise.py), kept in work_dir/final/; 0: none.
    personalise_steps: int = 0
    personalise_mode: str = "full"  # full | lora
    personalise_lr: float | None = None  # default: where the inner schedule ends (LoRA: 3x)
    lora_rank: int = 8
    poll_seconds: float = 10.0  # long-poll length per GetTask
    reconnect_timeout_seconds: float = 300.0  # give up after the aggregator is away this long
    save_deltas: bool = False  # audit trail: every pushed delta in work_dir/deltas/
    # After each round's training, keep the local model and inner optimizer state in
    # work_dir/checkpoints/ (the last two rounds): a restarted node resumes exactly, and a
    # version trained again after a failed round starts from the state before it.
    save_round_state: bool = True
    kit: str = ""  # this organisation's startup kit (`fedpt ca issue`): mutual TLS
    insecure: bool = (
        False  # plain text to an --insecure aggregator: trusted networks and tests only
    )
    # Prometheus metrics of rank 0 (node/prometheus.py) at http://metrics_host:metrics_port/metrics;
    # 0: off. Loopback by default: a node's numbers describe its private training run.
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    # The CPU packages' RAPL energy counters (node/energy.py): where this host's powercap
    # folder is seen (a container may mount the host's /sys elsewhere).
    powercap_root: str = str(POWERCAP_ROOT)

    def __post_init__(self) -> None:
        if not self.data:
            raise NodeConfigError("a node needs --data (its private corpus)")
        if self.organisation:
            try:
                pki.check_organisation(self.organisation)
            except pki.PKIError as e:
                raise NodeConfigError(f"--organisation: {e}") from e
        _ = self.launch  # raises LaunchError on bad ranks, hosts or endpoint
        if not self.kit and not self.insecure and not self.node_rank:  # other hosts never dial out
            raise NodeConfigError(
                "a node needs --kit (its startup kit) for mutual TLS, or --insecure"
            )
        if not 0 <= self.metrics_port < 65536:
            raise NodeConfigError(
                f"metrics_port {self.metrics_port} is not a TCP port (0: no metrics)"
            )
        if self.nproc_per_node < 1 or self.poll_seconds <= 0 or self.reconnect_timeout_seconds <= 0:
            raise NodeConfigError(
                "nproc_per_node ≥ 1, poll_seconds > 0, reconnect_timeout_seconds > 0"
            )
        try:
            _ = self.personalisation
        except PersonaliseError as e:
            raise NodeConfigError(str(e)) from e
        _ = self.curation_config  # raises CurationConfigError on a bad or unreadable file

    @functools.cached_property
    def curation_config(self) -> CurationConfig | None:
        """The `curation` file's [curation] table (read once); None without one."""
        return load_curation_config(Path(self.curation)) if self.curation else None

    @property
    def personalisation(self) -> PersonaliseConfig:
        return PersonaliseConfig(self.personalise_steps, self.personalise_mode,
                                 self.personalise_lr, self.lora_rank)  # fmt: skip

    @property
    def wants_final_model(self) -> bool:
        """Whether the node pulls the final global model when the federation ends."""
        return self.score_global or self.personalise_steps > 0

    @property
    def launch(self) -> Launch:
        return Launch(self.nproc_per_node, self.nnodes, self.node_rank, self.rdzv_endpoint)

    @property
    def organisation_name(self) -> str:
        return self.organisation or pki.organisation_from(
            Path(self.data.replace("builtin:", "")).name
        )


def load_node_config(path: Path | None, overrides: dict) -> NodeConfig:
    table: dict = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise NodeConfigError(f"cannot read {path}: {e}") from e
        unknown = sorted(set(raw) - {"node"})
        if unknown:
            raise NodeConfigError(f"{path}: unknown tables {', '.join(unknown)} (expected [node])")
        table = dict(raw.get("node", {}))
    return dataclass_from_dict(NodeConfig, {**table, **overrides}, "[node]", NodeConfigError)


@dataclass
class RoundRecord:
    round: int
    version: int
    wait_seconds: float  # polling for this task
    pull_seconds: float
    train_seconds: float
    push_seconds: float
    train_loss: float
    tokens: int
    pushed: bool
    base_val_loss: float | None = None  # the pulled global model on the validation split
    # Joules from the pull until the update was encoded (node/energy.py); None: not measured.
    gpu_energy_joules: float | None = None
    cpu_energy_joules: float | None = None


class Participant:
    def __init__(self, cfg: NodeConfig, env: DistEnv, log: Callable[[str], None] = print,
                 order: RoundOrder | None = None) -> None:  # fmt: skip
        self.cfg, self.env = cfg, env
        self.order = order  # what the scheduler's message said (run(once=True) only)
        self.log = log if env.is_main else (lambda _m: None)
        self.work_dir = Path(cfg.work_dir)
        self.client: AggregatorClient | None = None
        self.kit: pki.StartupKit | None = None
        if env.is_main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            kit = pki.load_kit(Path(cfg.kit)) if cfg.kit else None
            self.kit = kit
            if kit is not None and cfg.organisation and cfg.organisation != kit.organisation:
                # The certificate is the identity: joining as the kit's organisation while
                # the logs say another would mislead whoever reads them.
                raise NodeConfigError(
                    f"--organisation {cfg.organisation!r} disagrees with the kit {cfg.kit}, "
                    f"issued to {kit.organisation!r}: drop --organisation or use that "
                    "organisation's kit"
                )
            if kit is None:
                self.log(
                    "WARNING: connecting in plain text (--insecure): use a startup kit outside tests"
                )
            self.client = AggregatorClient(
                cfg.aggregator, cfg.organisation_name, kit=kit, log=self.log,
                admission_token=order.admission_token if order else "",
            )  # fmt: skip
        self.secagg: NodeSecAgg | None = None
        self.federation_id = ""
        self.spec = pb.FederationSpec()
        # The quantization error of this node's last update (model version, tensors), added to
        # its next one; also kept on disk in work_dir/residual/ with the round state.
        self._residual: tuple[int, dict] | None = None
        self._residual_dir = self.work_dir / "residual"
        self._held: tuple[int, dict] | None = None  # the last global model pulled (rank 0)
        self.total_rounds = 0  # from the federation's spec; 0: until the aggregator stops it
        self.trained: dict | None = None  # a round trained before a restart, not yet pushed
        self.trained_versions: set[int] = set()  # versions this process trained from
        self.left_rounds: set[int] = set()  # rounds this node dropped out of
        self.rounds_log = MetricsLog(self.work_dir / "rounds.jsonl" if env.is_main else None)
        self.prometheus: NodeMetrics | None = None  # rank 0 with --metrics-port
        if env.is_main and cfg.metrics_port:
            self.prometheus = NodeMetrics()
            port = self.prometheus.serve(cfg.metrics_port, cfg.metrics_host)
            self.log(f"Prometheus metrics on http://{cfg.metrics_host}:{port}/metrics")
        self.energy: EnergyMeter | None = None  # rank 0: its host's GPUs and CPU packages
        if env.is_main:
            self.energy = EnergyMeter(powercap_root=cfg.powercap_root, log=self.log)
            hosts = " (host 0's only)" if cfg.nnodes > 1 else ""
            self.log(self.energy.describe() + hosts)

    # ---- set-up -------------------------------------------------------------------------------
    def _join(self) -> pb.FederationSpec:
        """Rank 0 joins, saying what its shards were curated with; every rank gets the spec."""
        raw = None
        if self.env.is_main:
            self.client.curation = self._shard_curation()
            try:
                reply = self._reconnecting(self.client.join, "join")
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                # The federation requires another data curation: no retry can change that.
                raise FederationMismatch(
                    f"the aggregator at {self.cfg.aggregator} refused this node: {e.details()}"
                ) from e
            self.log(
                f"joined {self.cfg.aggregator} as {reply.node_id} ({self.cfg.organisation_name})"
            )
            raw = reply.spec.SerializeToString()
        spec = pb.FederationSpec()
        spec.ParseFromString(broadcast_bytes(raw, self.env))
        self.federation_id, self.spec = spec.federation_id, spec
        self.total_rounds = spec.total_rounds
        if self.env.is_main and is_secure(spec.delta_encoding):
            if self.kit is None:
                raise FederationMismatch(
                    "this federation uses secure aggregation: the node needs its --kit"
                )
            # Under a scheduler that carries the other stages, their secrets are in work_dir.
            keep_dir = self.work_dir / "secagg" if self._stages_elsewhere else None
            self.secagg = NodeSecAgg(self.client, self.kit, spec.federation_id, spec.name,
                                     keep_dir=keep_dir)  # fmt: skip
        return spec

    def _shard_curation(self) -> pb.DataCuration:
        """What this node's shards were curated with, from their train manifest: the hash and
        counts, never text. A raw corpus with --curation is curated here, with the node's own
        tokenizer, so that a federation requiring another curation refuses the node before it
        trains (_build_trainer then finds those shards in the cache)."""
        prepared = Path(self.cfg.data).expanduser()
        if (prepared / "train" / MANIFEST_NAME).is_file():
            found = shard_curation(prepared)
        elif self.cfg.curation:
            tokenizer = open_tokenizer(self.cfg.tokenizer or None)
            root, _ = prepare_data(self.cfg.data, tokenizer, cache_dir(),
                                   curation=self.cfg.curation_config)  # fmt: skip
            found = shard_curation(root)
        else:
            found = None
        if not found:
            return pb.DataCuration(sha256=NO_CURATION)
        return pb.DataCuration(sha256=found.get("sha256") or NO_CURATION,
                               documents_in=int(found.get("documents_in", 0)),
                               documents_kept=int(found.get("documents_kept", 0)),
                               removed={str(k): int(v) for k, v in (found.get("removed") or {}).items()})  # fmt: skip

    @property
    def _stages_elsewhere(self) -> bool:
        """Secure aggregation's key, share and unmask stages are the scheduler's messages."""
        return self.order is not None and self.order.secagg_by_scheduler

    def _build_trainer(self, spec: pb.FederationSpec) -> Trainer:
        tokenizer = self._tokenizer(json.loads(spec.tokenizer_json))
        try:
            model_config = ModelConfig.from_dict(json.loads(spec.model_config_json))
        except (ConfigError, json.JSONDecodeError) as e:
            raise FederationMismatch(f"the federation's model config is unusable here: {e}") from e
        if tokenizer.vocab_size > model_config.vocab_size:
            raise FederationMismatch(
                "the tokenizer's vocabulary is larger than the federation's model"
            )
        total_rounds = spec.total_rounds or 1000
        train_table = json.loads(spec.train_config_json or "{}")
        # The schedule spans the whole federation: H inner steps per round, every round.
        train_cfg = TrainConfig.from_dict({**train_table, "steps": total_rounds * spec.inner_steps})
        source = curated_source(self.cfg.data, self.cfg.curation_config, tokenizer, self.env,
                                self.log)  # fmt: skip
        train, val = load_splits(source, tokenizer, self.env, self.log)
        self.model_specs = self._model_specs(model_config)
        return Trainer(model_config, train_cfg, train, env=self.env, val_data=val,
                       tokenizer_spec=tokenizer.spec(), out_dir=self.work_dir, log=self.log)  # fmt: skip

    def _tokenizer(self, spec: dict) -> Tokenizer:
        if spec.get("kind") == "byte":
            return ByteTokenizer()
        if not self.cfg.tokenizer:
            raise FederationMismatch(
                "the federation uses a BPE tokenizer: pass --tokenizer with its JSON file"
            )
        tokenizer = load_tokenizer(spec, self.cfg.tokenizer)  # refuses a different sha256
        return tokenizer

    @staticmethod
    def _model_specs(model_config: ModelConfig) -> list[TensorSpec]:
        with torch.device("meta"):
            return specs_of(model_state(GPT(model_config)))

    # ---- the round loop -----------------------------------------------------------------------
    def run(self, once: bool = False) -> list[RoundRecord]:
        """Take part in every round until the federation has finished, then pull, score and
        personalise the final model. `once`: one round, for a process started per round (a
        Flower ClientApp, node/flower.py): train and push it, answer its secure-aggregation
        stages, and return once the aggregator has moved past it (or, when the scheduler's
        messages carry those stages, once pushed); the inner state comes from and goes to
        work_dir as between rounds. With the scheduler's `order` (node/round_order.py), only
        that round, from that model."""
        spec = self._join()
        trainer = self._build_trainer(spec)
        records: list[RoundRecord] = []
        try:
            self.trained = self._resume(trainer)
            while True:
                started = time.perf_counter()
                kind, round_number, version = self._next_task()
                ordered = self.order is None or self._as_ordered(kind, round_number, version)
                if once and not ordered:
                    return records
                if kind == pb.Task.STOP:
                    self.log("the federation has finished")
                    self._finish(trainer, spec, version)
                    return records
                record = self._train_round(trainer, spec, round_number, version)
                record.wait_seconds = (
                    time.perf_counter()
                    - started
                    - (record.pull_seconds + record.train_seconds + record.push_seconds)
                )
                records.append(record)
                self.rounds_log.write(dataclasses.asdict(record))
                if self.prometheus is not None:
                    last = getattr(trainer, "last_log", None)
                    self.prometheus.record_round(record, spec.inner_steps,
                                                 last.mfu if last is not None else None)  # fmt: skip
                if once:
                    if self.env.is_main and record.pushed and not self._stages_elsewhere:
                        self._until_round_closes(round_number)
                    return records
        finally:
            trainer.close()
            self.rounds_log.close()
            if self.prometheus is not None:
                self.prometheus.stop()
            if self.energy is not None:
                self.energy.close()
            if self.client is not None:
                self.client.close()

    def _as_ordered(self, kind: int, round_number: int, version: int) -> bool:
        """Whether the data plane's task is the one the scheduler's message started this
        process for (same on every rank). Another round, or the federation's end in a process
        started to train, is left to the message that asks for it; another model version for
        the same round is refused: someone other than the message's sender is answering."""
        order = self.order
        training = kind == pb.Task.TRAIN
        if order.round >= 0 and (not training or round_number != order.round):
            now = f"round {round_number}" if training else "nothing (the federation has finished)"
            self.log(f"started for round {order.round}, but the aggregator asks for {now}: "
                     "leaving it to the message for it")  # fmt: skip
            return False
        if order.round < 0 and training:
            raise ModelMismatch(
                f"started to pull the final model v{order.version}, but the aggregator runs "
                f"round {round_number}"
            )
        if version >= 0 and version != order.version:
            raise ModelMismatch(
                f"the aggregator offers model version {version}; the message that started this "
                f"node named version {order.version}"
            )
        return True

    def _until_round_closes(self, round_number: int) -> None:
        """Answer this round's secure-aggregation stages until a task names a later round, or
        STOP (rank 0). A later round's tasks are left to the process that takes part in it."""
        while True:
            reply = self._reconnecting(
                lambda: self.client.get_task(self.cfg.poll_seconds), "get a task"
            )
            if reply.kind == pb.Task.STOP or reply.round > round_number:
                return
            if reply.kind in SECAGG_STAGES:
                self._secagg_stage(reply)

    def _resume(self, trainer: Trainer) -> dict | None:
        """Load the state the last process kept (collective); the round it trained, if any."""
        if not self.cfg.save_round_state:
            return None
        found = trainer.latest_checkpoint()
        if found is None:
            return None
        state = trainer.checkpoint_state(found).get("extra", {})
        if state.get("federation") != self.federation_id:
            self.log(f"not resuming from {found}: it belongs to another federation")
            return None
        trainer.load_checkpoint(found)
        self.trained_versions.add(state["version"])
        self.log(
            f"resumed the inner state kept after round {state['round']} (model version "
            f"{state['version']}) from {found}"
        )
        return state

    def _local_round(
        self, trainer: Trainer, spec: pb.FederationSpec, round_number: int, version: int,
        global_weights: dict[str, torch.Tensor],
    ) -> tuple[float, float | None, RoundEnergy | None]:  # fmt: skip
        """Train the round's H inner steps from the global model, and keep the result so that a
        restarted process can push it without training again; (the mean training loss, the
        global model's validation loss before training, the energy kept with a round trained
        before a restart: None when trained now). The data position and schedule follow
        the model version, so training a version again (after a restart or a failed round)
        repeats the same steps exactly."""
        kept = self.trained
        self.trained = None
        if kept is not None and (kept["round"], kept["version"]) == (round_number, version):
            self.log(f"round {round_number}: pushing the update trained before the restart")
            energy = RoundEnergy(kept.get("gpu_energy_joules"), kept.get("cpu_energy_joules"))
            return float(kept["train_loss"]), kept.get("base_val_loss"), energy
        if version in self.trained_versions:
            self._state_before(trainer, version)  # that round failed: this one replaces it
        trainer.load_global(global_weights)
        base_val_loss = trainer.evaluate() if self.cfg.score_global else None
        if self.cfg.reset_inner_optimizer:
            trainer.reset_optimizer()
        elif self.cfg.reset_inner_momentum:
            trainer.reset_optimizer(momentum_only=True)
        trainer.seek(version * spec.inner_steps)
        steps = spec.inner_steps
        if crash_points.armed("node.train"):
            losses = trainer.train(steps // 2)
            crash_points.reached("node.train", round_number)
            losses += trainer.train(steps - steps // 2)
        else:
            losses = trainer.train(steps)
        train_loss = sum(losses) / len(losses)
        self.trained_versions.add(version)
        if self.cfg.save_round_state:
            energy = self.energy.read() if self.energy is not None else RoundEnergy()
            kept = {"federation": self.federation_id, "round": round_number, "version": version,
                    "train_loss": train_loss, "base_val_loss": base_val_loss,
                    "gpu_energy_joules": energy.gpu_joules,
                    "cpu_energy_joules": energy.cpu_joules}  # fmt: skip
            trainer.save_checkpoint(kept)
            if self.env.is_main:  # the last two: this round's, and the state before it
                prune_checkpoints(trainer.checkpoint_root(), keep_latest=2)
        return train_loss, base_val_loss, None

    def _state_before(self, trainer: Trainer, version: int) -> None:
        """Go back to the inner state this node had before it first trained `version` (whose
        round then failed), so that the retried round repeats it exactly: the newest kept
        state from an earlier version, else a fresh optimizer (collective)."""
        earlier = None
        for directory in trainer.checkpoint_folders() if self.cfg.save_round_state else ():
            extra = trainer.checkpoint_state(directory).get("extra", {})
            if extra.get("federation") == self.federation_id and extra["version"] < version:
                earlier = directory
        if earlier is not None:
            trainer.load_checkpoint(earlier)
        else:
            trainer.reset_optimizer()
        self.log(
            f"version {version} is being trained again (its round failed): inner state "
            f"{'from ' + str(earlier) if earlier else 'reset'}"
        )

    def _next_task(self) -> tuple[int, int, int]:
        """Rank 0 long-polls until it has TRAIN or STOP; every rank learns (kind, round, version)."""
        task = (0, 0, 0)
        if self.env.is_main:
            while True:
                try:
                    reply = self._reconnecting(
                        lambda: self.client.get_task(
                            self.cfg.poll_seconds, final_model=self.cfg.wants_final_model
                        ),
                        "get a task",
                    )
                except AggregatorAway:
                    if not self._final_round_done():
                        raise
                    self.log(
                        f"the aggregator is gone after the final round ({self.total_rounds}) "
                        "this node took part in; finishing"
                    )
                    task = (pb.Task.STOP, 0, -1)  # -1: no final model to pull
                    break
                if (
                    reply.kind in (pb.Task.TRAIN, *SECAGG_STAGES)
                    and reply.round in self.left_rounds
                ):
                    # This node cannot take part in that round any more: wait for the next.
                    time.sleep(min(self.cfg.poll_seconds, 1.0))
                    continue
                if reply.kind in (pb.Task.TRAIN, pb.Task.STOP):
                    task = (reply.kind, reply.round, reply.model_version)
                    break
                if reply.kind in SECAGG_STAGES and self._stages_elsewhere:
                    # The scheduler's message for that stage answers it, not this process.
                    time.sleep(min(self.cfg.poll_seconds, 1.0))
                elif reply.kind in SECAGG_STAGES:
                    self._secagg_stage(reply)
        as_tensor = torch.tensor(task, dtype=torch.int64)
        as_bytes = broadcast_bytes(
            as_tensor.numpy().tobytes() if self.env.is_main else None, self.env
        )
        kind, round_number, version = torch.frombuffer(
            bytearray(as_bytes), dtype=torch.int64
        ).tolist()
        return kind, round_number, version

    def _final_round_done(self) -> bool:
        """This node trained from the last model version of a federation with a round limit."""
        last = max(self.trained_versions, default=-1)
        return self.total_rounds > 0 and last + 1 >= self.total_rounds

    def _train_round(
        self, trainer: Trainer, spec: pb.FederationSpec, round_number: int, version: int
    ) -> RoundRecord:
        t0 = time.perf_counter()
        if self.energy is not None:
            self.energy.start()
        global_weights = self._pull(round_number, version)
        if global_weights is None:  # the round moved on while this node was away
            self.left_rounds.add(round_number)
            return RoundRecord(round_number, version, 0.0, time.perf_counter() - t0, 0.0, 0.0,
                               math.nan, 0, False)  # fmt: skip
        t1 = time.perf_counter()
        train_loss, base_val_loss, kept_energy = self._local_round(
            trainer, spec, round_number, version, global_weights
        )
        t2 = time.perf_counter()
        local = trainer.full_weights()
        tokens = spec.inner_steps * trainer.cfg.tokens_per_step(self.env.world_size)
        pushed = True
        if self.env.is_main:
            delta = pseudo_gradient(global_weights, local)
            pushed = self._push(round_number, version, delta, tokens, train_loss, base_val_loss,
                                kept_energy)  # fmt: skip
        energy = self._round_energy(kept_energy)  # as pushed; stopped here if nothing was
        barrier(self.env)
        t3 = time.perf_counter()
        scored = (
            "" if base_val_loss is None else f"version {version} val loss {base_val_loss:.4f}, "
        )
        self.log(
            f"round {round_number}: {scored}trained {spec.inner_steps} steps from version "
            f"{version}, loss {train_loss:.4f}, pull {t1 - t0:.1f}s train {t2 - t1:.1f}s push "
            f"{t3 - t2:.1f}s"
        )
        return RoundRecord(round_number, version, 0.0, t1 - t0, t2 - t1, t3 - t2, train_loss,
                           tokens, pushed, base_val_loss, energy.gpu_joules,
                           energy.cpu_joules)  # fmt: skip

    def _round_energy(self, kept: RoundEnergy | None) -> RoundEnergy:
        """The round's energy: kept with a round trained before a restart, else measured from
        its start until now, or until the first call after it (rank 0; not measured elsewhere)."""
        if kept is not None:
            return kept
        return self.energy.stop() if self.energy is not None else RoundEnergy()

    # ---- the end of the federation ---------------------------------------------------------------
    def _finish(self, trainer: Trainer, spec: pb.FederationSpec, version: int) -> None:
        """Pull the final global model (rank 0), score it on the validation split, personalise
        it if asked, and keep both in work_dir/final/ with report.json (collective)."""
        if not self.cfg.wants_final_model or version < 0:
            return
        if self.env.is_main:
            weights = None
            try:
                weights = self._fetch_global(self.total_rounds, version)
            except grpc.RpcError as e:  # the end of the federation: no retries, just say so
                self.log(f"the final model v{version} could not be pulled ({e.code().name}): "
                         "it is not scored or personalised here")  # fmt: skip
            finally:
                # Tell the aggregator this node has what it needs: it may shut down.
                with contextlib.suppress(grpc.RpcError):
                    self.client.get_task(0.0)
            if weights is not None:
                self._final_report(trainer, spec, version, weights)
        barrier(self.env)

    def _final_report(
        self, trainer: Trainer, spec: pb.FederationSpec, version: int, weights: dict
    ) -> dict:
        """Score the final model on this node's validation split (and personalise it), on
        rank 0's device; writes work_dir/final/{global,personalised}.safetensors, report.json."""
        final_dir = self.work_dir / "final"
        model = GPT(trainer.model_config)
        load_weights_into(model, weights, source=f"global model v{version}")
        save_model(model, final_dir / "global.safetensors", tokenizer_spec=trainer.tokenizer_spec,
                   seq_len=trainer.cfg.seq_len)  # fmt: skip
        one = DistEnv(device=self.env.device)
        report: dict = {"federation": self.federation_id, "version": version,
                        "organisation": self.cfg.organisation_name}  # fmt: skip
        pcfg = self.cfg.personalisation
        if pcfg.steps > 0:
            # The state kept after this node's last round (rank 0 wrote it; not collective).
            kept = (
                latest_checkpoint(trainer.checkpoint_root()) if self.cfg.save_round_state else None
            )
            result = personalise(model, trainer.train_data, trainer.val_data, trainer.cfg, pcfg,
                                 start_step=version * spec.inner_steps, inner_state=kept, env=one)  # fmt: skip
            save_model(result.model, final_dir / "personalised.safetensors",
                       tokenizer_spec=trainer.tokenizer_spec, seq_len=trainer.cfg.seq_len)  # fmt: skip
            report["global_val_loss"] = result.global_val_loss
            report["personalised"] = result.report()
            self.log(f"final model v{version}: val loss {loss_text(result.global_val_loss)}; "
                     f"personalised ({pcfg.mode}, {pcfg.steps} steps, {result.seconds:.1f}s): val "
                     f"loss {loss_text(result.val_loss)}")  # fmt: skip
        else:
            report["global_val_loss"] = validation_loss(
                model.to(one.device), trainer.val_data, trainer.cfg, one
            )
            self.log(f"final model v{version}: val loss {loss_text(report['global_val_loss'])}")
        write_json_atomic(final_dir / "report.json", report)
        return report

    def _secagg_stage(self, task: pb.Task) -> None:
        """A key-exchange or unmasking step (rank 0 only; the other ranks wait for TRAIN)."""
        if self.secagg is None:
            raise FederationMismatch(
                "the aggregator asked for secure aggregation this node was not set up for"
            )
        stage = {pb.Task.SECAGG_ADVERTISE_KEYS: self.secagg.advertise, pb.Task.SECAGG_SHARE_KEYS: self.secagg.share,
                 pb.Task.SECAGG_UNMASK: self.secagg.unmask}[task.kind]  # fmt: skip
        name = pb.Task.Kind.Name(task.kind)
        try:
            if task.kind == pb.Task.SECAGG_UNMASK:
                crash_points.reached("node.unmask", task.round)
            self._reconnecting(lambda: stage(task.round), name.lower())
            if task.kind == pb.Task.SECAGG_ADVERTISE_KEYS:
                crash_points.reached("node.advertise", task.round)
            elif task.kind == pb.Task.SECAGG_SHARE_KEYS:
                crash_points.reached("node.share", task.round)
        except SecAggRefused as e:
            self.log(f"round {task.round}: leaving secure aggregation: {e}")
            self.left_rounds.add(task.round)
        except grpc.RpcError as e:
            if e.code() not in SKIP_ROUND_CODES:
                raise
            self.left_rounds.add(task.round)
            self.log(f"round {task.round}: {name} not taken ({e.details()})")

    def _pull(self, round_number: int, version: int) -> dict[str, torch.Tensor] | None:
        """The global model on every rank; None (on every rank) when the aggregator no longer
        serves `version`: a newer model was committed while this node was away."""
        weights = None
        if self.env.is_main:
            try:
                weights = self._reconnecting(
                    lambda: self._fetch_global(round_number, version), "pull"
                )
                self._held = (version, weights)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                self.log(f"round {round_number}: skipped, the model moved on ({e.details()})")
        superseded = broadcast_bytes(b"skip" if weights is None else b"pull", self.env) == b"skip"
        if superseded:
            return None
        if not self.env.is_main:
            weights = {s.name: torch.empty(s.shape, dtype=torch.float32) for s in self.model_specs}
        return broadcast_tensors(weights, self.env)

    def _fetch_global(self, round_number: int, version: int) -> dict[str, torch.Tensor]:
        """Model `version` (rank 0): from the compressed outer update when this node holds the
        version before it and the federation sends updates, else the whole model."""
        chunk_bytes = self.spec.chunk_bytes or DEFAULT_CHUNK_BYTES
        model_bytes = sum(math.prod(s.shape) * 4 for s in self.model_specs)  # fp32 on the wire
        with transfer_bar(f"round {round_number} pull", model_bytes, chunk_bytes) as on_chunks:

            def progress(chunks: int) -> None:
                crash_points.reached("node.pull", round_number)
                on_chunks(chunks)

            return self._fetch_global_with(round_number, version, progress)

    def _fetch_global_with(
        self, round_number: int, version: int, progress: Callable[[int], None]
    ) -> dict[str, torch.Tensor]:
        held, self._held = self._held, None  # an update is added into it in place
        if held is not None and held[0] == version:
            return held[1]
        encoding = self.spec.download_encoding
        order = self.order
        announced = order.model_sha256 if order and order.version == version else None
        if held is not None and held[0] == version - 1 and encoding not in ("", "fp32"):
            weights = self.client.pull_from_previous(version, held[1], encoding, progress=progress,
                                                     announced_sha256=announced)  # fmt: skip
            if weights is not None:
                return weights
            self.log(
                f"round {round_number}: the compressed update did not verify; pulling the model"
            )
            held = None  # a mix of two versions now, and not what the aggregator serves
        # The old version's memory takes the new one: no fresh model-sized allocation.
        into = held[1] if held is not None and list(specs_of(held[1])) == self.model_specs else None
        return self.client.pull_model(version, expected=self.model_specs, progress=progress,
                                      into=into, announced_sha256=announced)  # fmt: skip

    def _push(
        self, round_number: int, version: int, delta: dict, tokens: int, loss: float,
        base_val_loss: float | None = None, kept_energy: RoundEnergy | None = None,
    ) -> bool:  # fmt: skip
        if self.cfg.save_deltas:
            path = self.work_dir / "deltas" / f"round_{round_number:08d}.safetensors"
            save_tensors_atomic(delta, path, {"round": str(round_number), "base_version": str(version),
                                              "num_tokens": str(tokens), "train_loss": repr(loss)})  # fmt: skip
        if not math.isfinite(loss):
            self.log(f"round {round_number}: local training diverged; not sending an update")
            return False
        try:
            payload = self._encode(round_number, version, delta, tokens)
            energy = self._round_energy(kept_energy)  # the round's local work ends here
            manifest = payload.manifest
            with transfer_bar(f"round {round_number} push", manifest.total_bytes,
                              manifest.chunk_bytes) as on_chunks:  # fmt: skip

                def progress(chunks: int) -> None:
                    crash_points.reached("node.upload", round_number)
                    on_chunks(chunks)

                self._reconnecting(
                    lambda: self.client.push_payload(
                        round_number, version, payload, tokens, loss, base_val_loss=base_val_loss,
                        gpu_energy_joules=energy.gpu_joules, cpu_energy_joules=energy.cpu_joules,
                        progress=progress,
                    ),
                    "push",
                )  # fmt: skip
        except SecAggRefused as e:
            self.log(f"round {round_number}: not sending an update: {e}")
            self.left_rounds.add(round_number)
            return False
        except grpc.RpcError as e:
            if e.code() not in SKIP_ROUND_CODES:
                raise
            self.log(f"round {round_number}: update not taken ({e.code().name}: {e.details()})")
            self.left_rounds.add(round_number)
            return False
        return True

    def _encode(
        self, round_number: int, version: int, delta: dict, tokens: int
    ) -> EncodedPayload | SpooledPayload:
        """Encode Δ plus the residual carried from this node's last update into a spool file,
        chunk by chunk; `delta`'s memory becomes the new residual, kept for the next update
        (in the round state on disk, so it survives a restart). Under secure aggregation only
        the masked, quantized update leaves the node."""
        encoding = self.spec.delta_encoding or "fp32"
        secure = None
        if self.secagg is not None:
            secure = self._reconnecting(
                lambda: self.secagg.secure_params(round_number, tokens, len(delta)), "mask"
            )
            key = self.secagg.rounding_key(version)
        else:
            key = plain_rounding_key(self.spec.name, self.cfg.organisation_name, version)
        residual = self._residual_before(version) if encoding != "fp32" else None
        payload = encode_update(
            delta, encoding, self.work_dir / "uploads" / "update.payload", self.spec.chunk_bytes,
            rounding_key=key, residual=residual, secure=secure,
        )  # fmt: skip
        if encoding != "fp32":
            self._keep_residual(version, delta)
        return payload

    def _residual_before(self, version: int) -> dict | None:
        """The residual left by this node's newest update to a version before `version` (a
        retried version is re-encoded from the same residual, so it sends the same bytes)."""
        if self._residual is not None and self._residual[0] < version:
            return self._residual[1]
        files = (
            sorted(self._residual_dir.glob("v*.safetensors")) if self.cfg.save_round_state else []
        )
        older = [f for f in files if int(f.stem[1:]) < version]
        return map_float32_tensors(older[-1]) if older else None

    def _keep_residual(self, version: int, residual: dict) -> None:
        self._residual = (version, residual)
        if self.cfg.save_round_state:
            save_tensors_atomic(residual, self._residual_dir / f"v{version:08d}.safetensors")
            for stale in sorted(self._residual_dir.glob("v*.safetensors"))[:-2]:
                stale.unlink()

    # ---- reconnection -------------------------------------------------------------------------
    def _reconnecting(self, call: Callable, what: str):
        """Run `call`, retrying with exponential backoff while the aggregator is unreachable,
        and re-joining when it no longer knows this node's session."""
        give_up = time.monotonic() + self.cfg.reconnect_timeout_seconds
        delay = 0.5
        while True:
            try:
                return call()
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.UNAUTHENTICATED and call != self.client.join:
                    self.log(f"{what}: session unknown to the aggregator; joining again")
                    self._reconnecting(self.client.join, "join")
                    continue
                if handshake_failed(e):
                    raise AggregatorUnreachable(
                        f"{what}: the TLS handshake with {self.cfg.aggregator} failed: the "
                        "aggregator does not accept this kit's certificate, or its own is not "
                        f"signed by this kit's CA ({(e.details() or '').strip()})"
                    ) from e
                if code not in RECONNECT_CODES:
                    raise
                if time.monotonic() + delay > give_up:
                    raise AggregatorAway(
                        f"{what}: the aggregator at {self.cfg.aggregator} was unreachable for "
                        f"{self.cfg.reconnect_timeout_seconds:g} s ({code.name}: "
                        f"{(e.details() or '').strip()})"
                    ) from e
                self.log(f"{what}: aggregator unavailable ({code.name}); retrying in {delay:.1f}s")
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
