"""The aggregator's side of secure aggregation (Bonawitz et al. 2017) for one round.

    ADVERTISE ─► SHARE ─► MASKED_INPUT ─► UNMASK ─► unmasked sum
      U1 = nodes whose signed keys arrived; U2 ⊆ U1 sent encrypted shares; U3 ⊆ U2 sent masked
      updates; at least t of U3 reveal shares: self-mask seeds of U3, mask keys of U2 \\ U3.

The aggregator relays keys and ciphertexts it cannot read, adds masked uint32 updates into one
modular accumulator, and learns only the sum: each survivor's self mask and each dropped node's
pairwise masks are rebuilt from t Shamir shares and subtracted. A stage that ends (everyone
answered, or its deadline passed) with fewer than the needed nodes fails the round. The math
lives in protos/secagg.py; this module only keeps the round's bookkeeping and enforces who may
say what, when.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from aggregator.errors import AlreadyExists, InvalidArgument, PermissionDenied, Refused
from protos import federation_pb2 as pb
from protos import secagg
from protos.delta_encoding import FlatLayout

KEY_BYTES = 32
MAX_CIPHERTEXT_BYTES = 4096
UNMASK_CHUNK = 1 << 20  # elements per unmasking step: bounds the keystream buffers


class Stage(enum.StrEnum):
    ADVERTISE = "ADVERTISE"
    SHARE = "SHARE"
    MASKED_INPUT = "MASKED_INPUT"
    UNMASK = "UNMASK"
    READY = "READY"  # the sum can be unmasked


@dataclass
class SecAggRound:
    federation_id: str
    round_number: int
    participants: tuple[str, ...]
    min_nodes: int
    clips: tuple[float, ...]  # public bound per tensor of the model, in its order
    threshold_setting: int  # 0: protos.secagg.default_threshold(|U1|)
    weight_unit: float
    stage_timeout: float
    now: float
    bits: int = 32  # the ring Z_2^bits the masked updates are summed in
    stage: Stage = Stage.ADVERTISE
    keys: dict[str, tuple[pb.SignedKeys, bytes]] = field(default_factory=dict)  # U1
    mailbox: dict[str, list[pb.EncryptedShare]] = field(default_factory=dict)
    shared: list[str] = field(default_factory=list)  # U2, in arrival order
    survivors: list[str] = field(default_factory=list)  # U3
    unmask_requests: dict[str, pb.UnmaskRequest] = field(default_factory=dict)
    threshold: int = 0
    scales: tuple[float, ...] = ()  # per tensor, chosen once the node count is known
    stage_deadline: float = 0.0

    def __post_init__(self) -> None:
        self.stage_deadline = self.now + self.stage_timeout

    # ---- what nodes send ----------------------------------------------------------------------
    def advertise(self, node_id: str, request: pb.AdvertiseKeysRequest, certificate_pem: bytes,
                  identity: Ed25519PublicKey) -> None:  # fmt: skip
        self._expect(Stage.ADVERTISE, node_id, self.participants, "advertise keys")
        if node_id in self.keys:
            raise AlreadyExists(f"keys for round {self.round_number} were already received")
        keys = request.keys
        if keys.node_id != node_id:
            raise PermissionDenied(
                f"keys name node {keys.node_id!r}, but the caller is {node_id!r}"
            )
        if len(keys.cipher_public) != KEY_BYTES or len(keys.mask_public) != KEY_BYTES:
            raise InvalidArgument("public keys must be 32-byte X25519 keys")
        message = secagg.keys_message(self.federation_id, self.round_number, node_id, keys.cipher_public,
                                      keys.mask_public)  # fmt: skip
        try:
            secagg.verify(identity, message, keys.signature)
        except secagg.SecAggError as e:
            raise PermissionDenied(f"the round keys' signature does not verify: {e}") from e
        self.keys[node_id] = (keys, certificate_pem)

    def share(self, node_id: str, request: pb.ShareKeysRequest) -> None:
        self._expect(Stage.SHARE, node_id, self.u1, "share keys")
        if node_id in self.shared:
            raise AlreadyExists(f"shares for round {self.round_number} were already received")
        recipients = [s.recipient for s in request.shares]
        if sorted(recipients) != self.u1 or any(s.sender != node_id for s in request.shares):
            raise InvalidArgument(
                "send exactly one share to every node that advertised keys, as yourself"
            )
        if any(len(s.ciphertext) > MAX_CIPHERTEXT_BYTES for s in request.shares):
            raise InvalidArgument("a share ciphertext is too large")
        for s in request.shares:
            self.mailbox.setdefault(s.recipient, []).append(s)
        self.shared.append(node_id)

    def may_upload(self, node_id: str) -> None:
        self._expect(Stage.MASKED_INPUT, node_id, self.u2, "upload a masked update")

    def unmask(self, node_id: str, request: pb.UnmaskRequest) -> None:
        self._expect(Stage.UNMASK, node_id, self.survivors, "reveal shares")
        if node_id in self.unmask_requests:
            raise AlreadyExists(
                f"shares for unmasking round {self.round_number} were already received"
            )
        seeds = [s.about_node for s in request.self_seed_shares]
        mask_keys = [s.about_node for s in request.mask_key_shares]
        if set(seeds) & set(mask_keys):
            # Both shares of one node would let the aggregator unmask that node's own update.
            raise InvalidArgument("never reveal both the seed and the mask key of the same node")
        # Complete, not merely allowed: every holder got a share from every node in U2, so an
        # honest answer names each survivor's seed and each dropped node's mask key once. An
        # empty or partial answer counted as one would let the stage end without the shares
        # the sum needs, and the round could never be unmasked.
        if sorted(seeds) != self.survivors or sorted(mask_keys) != self.dropped:
            raise InvalidArgument(
                "reveal exactly one seed share for every survivor "
                f"({', '.join(self.survivors)}) and one mask-key share for every dropped node "
                f"({', '.join(self.dropped) or 'none'})"
            )
        for share in [*request.self_seed_shares, *request.mask_key_shares]:
            if not secagg.is_share_value(share.share):
                raise InvalidArgument(
                    f"the share about {share.about_node} is not a {secagg.SHARE_BYTES}-byte "
                    "field element"
                )
        self.unmask_requests[node_id] = request

    def _expect(self, stage: Stage, node_id: str, members: Iterable[str], action: str) -> None:
        if self.stage != stage:
            raise Refused(
                f"round {self.round_number} is in stage {self.stage}, not accepting {action}"
            )
        if node_id not in members:
            raise PermissionDenied(f"this node may not {action} in round {self.round_number}")

    # ---- views --------------------------------------------------------------------------------
    @property
    def u1(self) -> list[str]:
        return sorted(self.keys)

    @property
    def u2(self) -> list[str]:
        return sorted(self.shared)

    @property
    def dropped(self) -> list[str]:
        return sorted(set(self.shared) - set(self.survivors))

    def share_index(self, node_id: str) -> int:
        return self.u1.index(node_id) + 1  # Shamir x coordinates are 1..|U1|

    def state_for(self, node_id: str) -> pb.SecAggState:
        if node_id not in self.participants:
            raise PermissionDenied(f"this node is not a participant of round {self.round_number}")
        state = pb.SecAggState(round=self.round_number)
        if self.stage == Stage.ADVERTISE:
            return state
        state.params.CopyFrom(pb.SecAggParams(
            clip=max(self.clips), scale=min(self.scales), threshold=self.threshold,
            weight_unit=self.weight_unit, tensor_clip=self.clips, tensor_scale=self.scales,
            ring_bits=self.bits,
        ))  # fmt: skip
        for n in self.u1:
            keys, cert = self.keys[n]
            state.peers.add(keys=keys, certificate_pem=cert, share_index=self.share_index(n))
        if self.stage in (Stage.MASKED_INPUT, Stage.UNMASK, Stage.READY):
            state.share_holders.extend(self.u2)
            state.shares_for_me.extend(
                s for s in self.mailbox.get(node_id, []) if s.sender in self.shared
            )
        if self.stage in (Stage.UNMASK, Stage.READY):
            state.survivors.extend(sorted(self.survivors))
            state.dropped.extend(self.dropped)
        return state

    # ---- transitions --------------------------------------------------------------------------
    def advance(self, now: float) -> str | None:
        """Close the current stage when it is complete or overdue; a reason when the round fails."""
        late = now >= self.stage_deadline
        if self.stage == Stage.ADVERTISE and (len(self.keys) == len(self.participants) or late):
            if len(self.keys) < max(self.min_nodes, 2):
                return f"only {len(self.keys)} node(s) advertised keys"
            self.threshold = self.threshold_setting or secagg.default_threshold(len(self.keys))
            if not 1 <= self.threshold <= len(self.keys):
                return f"threshold {self.threshold} does not fit {len(self.keys)} nodes"
            try:
                self.scales = tuple(
                    secagg.choose_scale(c, len(self.keys), self.bits) for c in self.clips
                )
            except secagg.SecAggError as e:
                return str(e)
            self._next(Stage.SHARE, now)
        elif self.stage == Stage.SHARE and (len(self.shared) == len(self.keys) or late):
            if len(self.shared) < self._needed():
                return f"only {len(self.shared)} node(s) shared keys; {self._needed()} needed"
            self._next(Stage.MASKED_INPUT, now)
        elif self.stage == Stage.UNMASK:
            answered = len(self.unmask_requests)
            if answered == len(self.survivors) or (late and answered >= self.threshold):
                self.stage = Stage.READY
            elif late:
                return f"only {answered} node(s) revealed shares; {self.threshold} needed"
        return None

    def close_inputs(self, survivors: Iterable[str], now: float) -> str | None:
        """The masked-input stage ends with these uploads (U3)."""
        self.survivors = sorted(survivors)
        if len(self.survivors) < self._needed():
            return f"only {len(self.survivors)} masked update(s) arrived; {self._needed()} needed"
        self._next(Stage.UNMASK, now)
        return None

    def _needed(self) -> int:
        """Nodes a stage needs: the Shamir threshold, and never fewer than the quorum."""
        return max(self.threshold, self.min_nodes)

    def _next(self, stage: Stage, now: float) -> None:
        self.stage, self.stage_deadline = stage, now + self.stage_timeout

    # ---- the sum ------------------------------------------------------------------------------
    def unmasked_mean_into(
        self, total: np.ndarray, layout: FlatLayout, tokens: dict[str, int], out: np.ndarray
    ) -> None:
        """out = the unmasked, dequantized sum / Σ weights, as float32, one chunk at a time:
        a copy of each chunk of the modular sum `total` (never the whole) loses the survivors'
        self masks and the pairwise masks they still hold with nodes that dropped after
        sharing, is read as signed integers of the ring's width and scaled per tensor.

        Chunks go from the last to the first, so `out` may be `total`'s own buffer read as
        float32 (StreamingAccumulator.widened): float i covers ring words ≥ i, all either in
        the chunk just copied or already done."""
        self_seeds = [self._reconstruct(u, "self") for u in self.survivors]
        pair_masks: list[tuple[bytes, int]] = []
        for d in self.dropped:
            mask_private = self._reconstruct(d, "mask")
            if secagg.x25519_public(mask_private) != self.keys[d][0].mask_public:
                raise Refused(f"the mask key rebuilt for {d} does not match its signed public key")
            for v in self.survivors:
                shared = secagg.x25519_shared(mask_private, self.keys[v][0].mask_public)
                seed = secagg.pairwise_seed(shared, self.federation_id, self.round_number, d, v)
                pair_masks.append((seed, secagg.pair_sign(v, d)))
        weight = self.total_weight(tokens)
        signed = f"int{self.bits}"
        for start in reversed(range(0, len(total), UNMASK_CHUNK)):
            piece = total[start : start + UNMASK_CHUNK].copy()
            secagg.unmask_chunk(piece, start, self_seeds, pair_masks)
            values = piece.view(signed)
            for i, lo, hi in layout.segments(start, start + piece.size):
                at = layout.offsets[i]
                out[at + lo : at + hi] = values[at + lo - start : at + hi - start] / (
                    self.scales[i] * weight
                )

    def _reconstruct(self, about: str, kind: str) -> bytes:
        shares = {}
        for holder, request in self.unmask_requests.items():
            revealed = request.self_seed_shares if kind == "self" else request.mask_key_shares
            for s in revealed:
                if s.about_node == about:
                    shares[self.share_index(holder)] = s.share
        try:
            return secagg.reconstruct_secret(shares, self.threshold)
        except secagg.SecAggError as e:
            raise Refused(f"cannot rebuild the {kind} secret of {about}: {e}") from e

    def total_weight(self, tokens: dict[str, int]) -> float:
        return math.fsum(tokens[u] / self.weight_unit for u in self.survivors)
