"""What the coordinator's jobs share: the current round, its secure aggregation, the model
version being served, and the one lock (with its condition) that guards them.

Each job (membership, round lifecycle, upload intake, commit) changes this state only under
`lock`, briefly and with no file I/O in between (database transactions that record a transition
stay under it, so the state and its row move together), and notifies `changed` when a waiting
GetTask may have something new to say. The served model is an immutable `GlobalModel` swapped
whole, so readers (PullModel) need no lock.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from aggregator.checkpoints import model_description
from aggregator.config import AggregatorConfig
from aggregator.downloads import OuterUpdate
from aggregator.errors import Unavailable
from aggregator.metrics import AggregatorMetrics
from aggregator.secure_aggregation import SecAggRound
from aggregator.store import RoundRow, Store, StoreError
from aggregator.traffic import DownloadTally
from model.train_config import TrainConfig
from protos import federation_pb2 as pb
from protos.codec import EncodedPayload, Manifest, SpooledPayload, TensorSpec, encode, specs_of
from protos.delta_encoding import is_secure, wire_specs


class RoundState(enum.StrEnum):
    OPEN = "OPEN"
    TRAINING = "TRAINING"
    COLLECTING = "COLLECTING"
    AGGREGATING = "AGGREGATING"
    COMMITTED = "COMMITTED"
    FAILED = "FAILED"


ACCEPTING = (RoundState.TRAINING, RoundState.COLLECTING)


class RecoveryError(RuntimeError):
    """The state folder and database cannot be resumed with this configuration."""


@dataclass(frozen=True)
class GlobalModel:
    """One model version as served: replaced whole, never changed in place."""

    version: int
    params: dict[str, torch.Tensor]
    payload: EncodedPayload
    model_specs: tuple[TensorSpec, ...]  # the model's fp32 tensors
    upload_specs: tuple[TensorSpec, ...]  # what a node's update must consist of
    # The compressed outer update from version − 1 (when the federation sends updates and
    # this process made it), and per tensor RMS × largest node weight of the mean update that
    # made this version (public: sets the next secure round's clip bounds), if known.
    update: OuterUpdate | None = None
    update_scale: tuple[float, ...] | None = None

    @classmethod
    def build(
        cls, params: dict[str, torch.Tensor], version: int, chunk_bytes: int, *, encoding: str,
        update_path: Path | None = None, update_manifest: Manifest | None = None,
        update_scale: tuple[float, ...] | None = None,
    ) -> GlobalModel:  # fmt: skip
        """Encode the model for serving. It hashes every byte (seconds at 1B parameters), so
        call it without the lock."""
        specs = tuple(specs_of(params))
        payload = encode(params, chunk_bytes)
        update = None
        if update_path is not None and update_manifest is not None:
            update = OuterUpdate(version, SpooledPayload(update_manifest, update_path),
                                 payload.manifest.sha256)  # fmt: skip
        return cls(version, params, payload, specs, tuple(wire_specs(encoding, specs)), update,
                   update_scale)  # fmt: skip


class Shared:
    def __init__(
        self,
        config: AggregatorConfig,
        store: Store,
        federation_id: str,
        spec: pb.FederationSpec,
        model: GlobalModel,
        *,
        clock: Callable[[], float],
        log: Callable[[str], None],
    ) -> None:
        self.config, self.store, self.clock, self.log = config, store, clock, log
        self.federation_id, self.spec = federation_id, spec
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.model = model
        self.round: RoundRow = store.current_round(federation_id)
        self.secagg: SecAggRound | None = None  # this round's secure aggregation, when on
        # Prometheus metrics of this process (aggregator/metrics.py): hooks that never raise.
        self.metrics = AggregatorMetrics()
        self.downloads = DownloadTally()  # bytes sent per round and node, until the round ends

    @property
    def secure(self) -> bool:
        return is_secure(self.config.delta_encoding)

    @property
    def model_description(self) -> dict[str, str]:
        """What each global checkpoint records about its model (aggregator/checkpoints.py)."""
        seq_len = TrainConfig.from_dict(self.config.train).seq_len
        return model_description(self.spec.model_config_json, self.spec.tokenizer_json, seq_len)

    @property
    def finished(self) -> bool:
        total = self.config.federation.rounds
        return total > 0 and self.model.version >= total

    def store_call(self, method, *args):
        try:
            return method(*args)
        except StoreError as e:
            raise Unavailable(str(e)) from e

    def move_round(self, state: RoundState) -> None:
        """Record the current round's new state, then hold it here. Caller holds `lock`."""
        self.store_call(self.store.set_round_state, self.federation_id, self.round.number, state)
        self.round = dataclasses.replace(self.round, state=str(state))
