"""Who may call: organisations join, get a node id and a session token, and are recognised by
that token (--insecure) or by their certified organisation name (mutual TLS). Under a scheduler
(Flower), `admissions` also asks each Join for the token of the message that asked the node in
(aggregator/admissions.py). A federation that requires a data curation configuration refuses
a node whose shards were curated otherwise (only its hash and counts travel: no text).

Its own lock, not the round's: a Join never waits for round work, and round work only asks how
many nodes joined. The lock is held across the node's database upsert so that the token cache
and the database agree on which token is a node's current one.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import uuid

from aggregator.admissions import Admissions
from aggregator.config import is_sha256
from aggregator.errors import InvalidArgument, Refused, Unauthenticated
from aggregator.state import Shared
from aggregator.store import NodeRow
from protos import federation_pb2 as pb
from protos import pki
from protos.curation import NO_CURATION

# The removal counts are stored with the node's capabilities: bounded so that they stay within
# a few KiB (32 × (64-character name + a 20-digit count)) whatever a node sends.
MAX_CURATION_REMOVALS = 32
MAX_CURATION_NAME_CHARS = 64


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def curation_record(curation: pb.DataCuration | None) -> dict:
    """A Join's curation as stored with the node's capabilities; absent or empty: "none"."""
    if curation is None:
        curation = pb.DataCuration()
    digest = curation.sha256 or NO_CURATION
    if digest != NO_CURATION and not is_sha256(digest):
        raise InvalidArgument(f"curation sha256 must be 64 lowercase hex digits or "
                              f"{NO_CURATION!r}, not {digest[:80]!r}")  # fmt: skip
    removed = dict(curation.removed)
    if len(removed) > MAX_CURATION_REMOVALS or any(
        not name or len(name) > MAX_CURATION_NAME_CHARS for name in removed
    ):
        raise InvalidArgument(f"curation removed counts: at most {MAX_CURATION_REMOVALS} names "
                              f"of 1 to {MAX_CURATION_NAME_CHARS} characters")  # fmt: skip
    if curation.documents_kept > curation.documents_in:
        raise InvalidArgument("curation documents_kept exceeds documents_in")
    return {"sha256": digest, "documents_in": curation.documents_in,
            "documents_kept": curation.documents_kept, "removed": removed}  # fmt: skip


def check_curation(required: str, digest: str) -> None:
    """Refuse a node whose shards were not curated with the `required` configuration."""
    if not required or digest == required:
        return
    theirs = "no curation" if digest == NO_CURATION else f"configuration {digest[:12]}…"
    raise Refused(
        f"this federation requires shards curated with configuration {required[:12]}… "
        "(fedpt data prepare --curation FILE, or fedpt node join --curation FILE); this node's "
        f"were prepared with {theirs}: prepare them with the federation's curation config"
    )


class Membership:
    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self._lock = threading.Lock()
        self._tokens: dict[str, NodeRow] = {}  # token digest -> node (cache of the store)
        self._by_organisation: dict[str, NodeRow] = {}  # certified organisation -> node
        self._registered: set[str] | None = None  # every node id in the store, read once
        self.admissions: Admissions | None = None  # set when a scheduler decides who joins

    def join(self, organisation: str, capabilities: dict, admission_token: str = "",
             curation: pb.DataCuration | None = None) -> tuple[NodeRow, str]:  # fmt: skip
        # One rule for every organisation name: the one its certificate was issued under.
        try:
            pki.check_organisation(organisation or "")
        except pki.PKIError as e:
            raise InvalidArgument(str(e)) from e
        curated = curation_record(curation)
        # Before the admission token is spent or anything stored: a refusal changes nothing.
        check_curation(self.shared.spec.required_curation_sha256, curated["sha256"])
        capabilities = {**capabilities, "curation": curated}
        if self.admissions is not None:  # before anything is stored: a refusal changes nothing
            self.admissions.admit(admission_token, organisation)
        s = self.shared
        token = secrets.token_urlsafe(32)
        node_id = f"node-{uuid.uuid4().hex[:12]}"
        with self._lock:
            node = s.store_call(s.store.upsert_node, s.federation_id, node_id, organisation,
                                token_digest(token), capabilities)  # fmt: skip
            self._tokens = {d: n for d, n in self._tokens.items() if n.id != node.id}
            self._tokens[token_digest(token)] = node
            self._by_organisation[node.organisation] = node
            if self._registered is not None:
                self._registered.add(node.id)
        s.log(f"node {node.id} joined for {organisation!r}")
        return node, token

    def node_of_organisation(self, organisation: str) -> NodeRow:
        """The node a certified organisation registered with Join."""
        s = self.shared
        with self._lock:
            node = self._by_organisation.get(organisation)
            if node is None:
                nodes = s.store_call(s.store.nodes, s.federation_id)
                node = next((n for n in nodes if n.organisation == organisation), None)
                if node is None:
                    raise Unauthenticated(
                        f"organisation {organisation!r} has not joined: call Join first"
                    )
                self._by_organisation[organisation] = node
            return node

    def authenticate(self, token: str) -> NodeRow:
        s = self.shared
        digest = token_digest(token or "")
        with self._lock:
            node = self._tokens.get(digest)
            if node is None:
                node = s.store_call(s.store.node_by_token, s.federation_id, digest)
                if node is None:
                    raise Unauthenticated("unknown or revoked session: call Join first")
                self._tokens[digest] = node
            return node

    def known_nodes(self) -> int:
        """Nodes that joined this federation, in this process or before a restart (all of them
        ready: no need to wait for the start grace). Certified nodes do not join again after a
        restart: counting this process's sessions gave 0 then, and the first two nodes back
        started a round without the others."""
        s = self.shared
        with self._lock:
            if self._registered is None:
                nodes = s.store_call(s.store.nodes, s.federation_id)
                self._registered = {n.id for n in nodes}
            return len(self._registered)
