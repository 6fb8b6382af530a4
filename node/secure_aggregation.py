"""A node's side of secure aggregation (Bonawitz et al. 2017): the aggregator only ever sees
this node's delta masked, and only the sum of all survivors' deltas unmasked.

Per round: advertise two fresh X25519 public keys signed with the organisation's Ed25519
identity key; check every peer's certificate (against the federation CA) and signature; send
each peer an encrypted Shamir share of this node's self-mask seed and mask private key; hand the
encoder (protos.delta_encoding) the public per-tensor clips and scales and the mask seeds, with
which it quantizes the weighted delta and adds the self mask and one pairwise mask per peer,
one chunk at a time; finally reveal, for
each survivor, its self-seed share and, for each node that dropped, its mask-key share — never
both for the same node, which would unmask that node alone.

A node whose stages run in different processes (a Flower ClientApp per message, node/flower.py)
keeps the round's secrets in a folder of its work dir (`keep_dir`), readable by its owner
only, and drops them once it has unmasked or a later round begins.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from protos import federation_pb2 as pb
from protos import pki, secagg
from protos.delta_encoding import SecureParams


class SecAggRefused(RuntimeError):
    """This node will not go on with the round: a peer's key or certificate does not verify,
    or the aggregator asked for something the protocol forbids."""


@dataclass
class RoundSecrets:
    cipher_private: bytes
    mask_private: bytes
    self_seed: bytes = b""
    peers: dict[str, pb.SignedKeys] = field(default_factory=dict)
    shares_for_me: list[pb.EncryptedShare] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({
            "cipher_private": self.cipher_private.hex(), "mask_private": self.mask_private.hex(),
            "self_seed": self.self_seed.hex(),
            "peers": {n: k.SerializeToString().hex() for n, k in self.peers.items()},
            "shares_for_me": [s.SerializeToString().hex() for s in self.shares_for_me],
        })  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> RoundSecrets:
        raw = json.loads(text)
        return cls(
            bytes.fromhex(raw["cipher_private"]), bytes.fromhex(raw["mask_private"]),
            bytes.fromhex(raw["self_seed"]),
            {n: pb.SignedKeys.FromString(bytes.fromhex(k)) for n, k in raw["peers"].items()},
            [pb.EncryptedShare.FromString(bytes.fromhex(s)) for s in raw["shares_for_me"]],
        )  # fmt: skip


class NodeSecAgg:
    """`client` carries the stages: the data plane's AggregatorClient, or anything with its
    node_id, advertise_keys, share_keys, secagg_state and unmask (node/flower_stages.py)."""

    def __init__(self, client, kit: pki.StartupKit, federation_id: str, federation_name: str = "",
                 keep_dir: Path | None = None) -> None:  # fmt: skip
        self.client, self.kit, self.federation_id = client, kit, federation_id
        self.federation_name = federation_name or federation_id
        self.rounds: dict[int, RoundSecrets] = {}
        self.keep_dir = keep_dir  # None: the secrets live in this process only

    @property
    def node_id(self) -> str:
        return self.client.node_id

    def advertise(self, round_number: int) -> None:
        cipher_private, cipher_public = secagg.generate_x25519()
        mask_private, mask_public = secagg.generate_x25519()
        message = secagg.keys_message(
            self.federation_id, round_number, self.node_id, cipher_public, mask_public
        )
        keys = pb.SignedKeys(node_id=self.node_id, cipher_public=cipher_public, mask_public=mask_public,
                             signature=secagg.sign(self.kit.identity_key, message))  # fmt: skip
        self.rounds = {
            round_number: RoundSecrets(cipher_private, mask_private)
        }  # older rounds are over
        self._forget_kept(keep=round_number)
        self._keep(round_number)
        self.client.advertise_keys(pb.AdvertiseKeysRequest(round=round_number, keys=keys))

    def _verified_peers(self, round_number: int, state: pb.SecAggState) -> dict[str, pb.PeerKeys]:
        peers, organisations = {}, set()
        for peer in state.peers:
            keys = peer.keys
            try:
                identity = pki.verify_certificate(peer.certificate_pem, self.kit.ca_pem)
                message = secagg.keys_message(self.federation_id, round_number, keys.node_id,
                                              keys.cipher_public, keys.mask_public)  # fmt: skip
                secagg.verify(identity.identity_public, message, keys.signature)
            except (pki.PKIError, secagg.SecAggError) as e:
                raise SecAggRefused(f"peer {keys.node_id}'s round keys do not verify: {e}") from e
            if identity.organisation in organisations or keys.node_id in peers:
                raise SecAggRefused(
                    f"organisation {identity.organisation} appears twice among the peers"
                )
            organisations.add(identity.organisation)
            peers[keys.node_id] = peer
        mine = self.rounds[round_number]
        own = peers.get(self.node_id)
        if own is None or own.keys.mask_public != secagg.x25519_public(mine.mask_private):
            raise SecAggRefused("the aggregator did not relay this node's own keys faithfully")
        return peers

    def share(self, round_number: int) -> None:
        mine = self._secrets(round_number)
        state = self.client.secagg_state(round_number)
        peers = self._verified_peers(round_number, state)
        mine.peers = {n: p.keys for n, p in peers.items()}
        threshold = state.params.threshold
        xs = [p.share_index for p in peers.values()]
        mine.self_seed = secagg.new_self_seed()
        seed_shares = secagg.split_secret(mine.self_seed, xs, threshold)
        key_shares = secagg.split_secret(mine.mask_private, xs, threshold)
        request = pb.ShareKeysRequest(round=round_number)
        for node_id, peer in peers.items():
            bundle = secagg.pack_share_bundle(
                seed_shares[peer.share_index], key_shares[peer.share_index]
            )
            key = self._share_key(
                mine, peer.keys.cipher_public, round_number, self.node_id, node_id
            )
            blob = secagg.encrypt_share_bundle(
                key, self.federation_id, round_number, self.node_id, node_id, bundle
            )
            request.shares.add(sender=self.node_id, recipient=node_id, ciphertext=blob)
        self._keep(round_number)
        self.client.share_keys(request)

    def _share_key(self, mine: RoundSecrets, peer_cipher_public: bytes, round_number: int,
                   sender: str, recipient: str) -> bytes:  # fmt: skip
        shared = secagg.x25519_shared(mine.cipher_private, peer_cipher_public)
        return secagg.share_key(shared, self.federation_id, round_number, sender, recipient)

    def secure_params(self, round_number: int, num_tokens: int, num_tensors: int) -> SecureParams:
        """The public quantization parameters and this node's mask seeds for its update in
        `round_number` (the masking itself runs chunk by chunk in protos.delta_encoding)."""
        mine = self._secrets(round_number)
        state = self.client.secagg_state(round_number)
        holders = list(state.share_holders)
        if self.node_id not in holders:
            raise SecAggRefused(
                "this node's shares were not accepted; it cannot take part in this round"
            )
        mine.shares_for_me = list(state.shares_for_me)
        self._keep(round_number)
        pair_seeds = {}
        for peer in holders:
            if peer != self.node_id:
                shared = secagg.x25519_shared(mine.mask_private, mine.peers[peer].mask_public)
                pair_seeds[peer] = secagg.pairwise_seed(
                    shared, self.federation_id, round_number, self.node_id, peer
                )
        params = state.params
        if len(params.tensor_clip) != num_tensors or len(params.tensor_scale) != num_tensors:
            raise SecAggRefused(
                f"the aggregator sent {len(params.tensor_scale)} tensor scales for a model of "
                f"{num_tensors} tensors"
            )
        return SecureParams(
            bits=params.ring_bits, clips=tuple(params.tensor_clip),
            scales=tuple(params.tensor_scale), weight=num_tokens / params.weight_unit,
            self_seed=mine.self_seed, pair_seeds=pair_seeds, node_id=self.node_id,
        )  # fmt: skip

    def rounding_key(self, version: int) -> bytes:
        """Secret, per node and model version (see protos.secagg.rounding_key)."""
        return secagg.rounding_key(
            self.kit.identity_key.private_bytes_raw(), self.federation_name, version
        )

    def unmask(self, round_number: int) -> None:
        mine = self._secrets(round_number)
        state = self.client.secagg_state(round_number)
        survivors, dropped = set(state.survivors), set(state.dropped)
        if survivors & dropped:
            raise SecAggRefused("the aggregator asked for both shares of the same node")
        request = pb.UnmaskRequest(round=round_number)
        for share in mine.shares_for_me:
            sender = share.sender
            if sender not in survivors and sender not in dropped:
                continue
            key = self._share_key(
                mine, mine.peers[sender].cipher_public, round_number, sender, self.node_id
            )
            try:
                bundle = secagg.decrypt_share_bundle(key, self.federation_id, round_number, sender, self.node_id,
                                                     share.ciphertext)  # fmt: skip
            except secagg.SecAggError as e:
                raise SecAggRefused(f"the share from {sender} does not decrypt: {e}") from e
            seed_share, key_share = secagg.unpack_share_bundle(bundle)
            if sender in survivors:
                request.self_seed_shares.add(about_node=sender, share=seed_share)
            else:
                request.mask_key_shares.add(about_node=sender, share=key_share)
        self.client.unmask(request)
        del self.rounds[round_number]  # answer at most once per round
        self._forget_kept()

    def _secrets(self, round_number: int) -> RoundSecrets:
        mine = self.rounds.get(round_number)
        if mine is None and self.keep_dir is not None:
            try:
                mine = RoundSecrets.from_json(self._kept_path(round_number).read_text())
            except FileNotFoundError:
                mine = None
            except (ValueError, KeyError, TypeError) as e:  # DecodeError is a ValueError
                raise SecAggRefused(
                    f"the kept secrets of round {round_number} are unreadable: {e}"
                ) from e
            if mine is not None:
                self.rounds = {round_number: mine}
        if mine is None:
            raise SecAggRefused(f"this node holds no keys for round {round_number} (it restarted?)")
        return mine

    # ---- secrets kept between processes -------------------------------------------------------
    def _kept_path(self, round_number: int) -> Path:
        return self.keep_dir / f"round-{round_number}.json"

    def _keep(self, round_number: int) -> None:
        """Write the round's secrets where the next stage's process finds them (owner-only,
        replaced atomically)."""
        if self.keep_dir is None:
            return
        self.keep_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._kept_path(round_number)
        partial = path.with_suffix(".partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.rounds[round_number].to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)

    def _forget_kept(self, keep: int | None = None) -> None:
        """Delete the kept secrets of every round but `keep`: those rounds are over."""
        if self.keep_dir is None or not self.keep_dir.is_dir():
            return
        for path in self.keep_dir.glob("round-*.json"):
            if keep is None or path.name != f"round-{keep}.json":
                path.unlink(missing_ok=True)
