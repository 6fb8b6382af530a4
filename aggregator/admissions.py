"""Admission tokens: who may join when a scheduler (Flower's ServerApp) decides who takes part.

Under Flower the ServerApp picks the SuperNodes of a round and sends each a TRAIN or EVALUATE
message; the node then joins fedpt's data plane with mutual TLS. A token in that message binds
the two: Join is refused without a token the ServerApp issued, so only a node Flower asked in
can open a data-plane session, and a token binds to the first organisation that presents it.
The same organisation may present it again (a Join retried after its reply was lost); another
organisation may not. A SuperNode keeps the organisation it first joined as, and an organisation
joins a round through one SuperNode only: two SuperNodes speaking for one organisation, or one
speaking for two, are refused. Tokens live until the next batch is issued (the next message).

Only sha256 digests of tokens are kept: the tokens themselves travel to the nodes and go.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from dataclasses import dataclass

from aggregator.errors import PermissionDenied, Unauthenticated


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Ticket:
    holder: str  # who the token was sent to (a Flower node id)
    purpose: str  # e.g. "train round 3": for messages only
    organisation: str = ""  # bound on first use


class Admissions:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, Ticket] = {}  # token digest -> ticket of the current batch
        self._organisation_of: dict[str, str] = {}  # holder -> organisation, for the whole run

    def issue(self, holders: list[str], purpose: str) -> dict[str, str]:
        """A fresh token per holder (by holder); every earlier token stops being valid."""
        tokens = {holder: secrets.token_urlsafe(32) for holder in holders}
        with self._lock:
            self._open = {_digest(t): Ticket(h, purpose) for h, t in tokens.items()}
        return tokens

    def admit(self, token: str, organisation: str) -> Ticket:
        """The ticket `token` opens for `organisation`, bound to it from now on; refused
        (changing nothing) when the token is unknown, spent on another organisation, or would
        make a SuperNode or an organisation speak for two."""
        with self._lock:
            ticket = self._open.get(_digest(token)) if token else None
            if ticket is None:
                raise Unauthenticated(
                    "this federation runs under a scheduler (Flower): a node joins with the "
                    "admission token of the message that asked it in; this one is missing, "
                    "unknown or expired"
                )
            if ticket.organisation and ticket.organisation != organisation:
                raise PermissionDenied(
                    f"this admission token was already used by organisation {ticket.organisation!r}"
                )
            earlier = self._organisation_of.get(ticket.holder)
            if earlier is not None and earlier != organisation:
                raise PermissionDenied(
                    f"SuperNode {ticket.holder} joined as organisation {earlier!r} before; it "
                    f"cannot join as {organisation!r}"
                )
            other = next(
                (t.holder for t in self._open.values()
                 if t.organisation == organisation and t.holder != ticket.holder),
                None,
            )  # fmt: skip
            if other is not None:
                raise PermissionDenied(
                    f"organisation {organisation!r} already joined {ticket.purpose} through "
                    f"SuperNode {other}"
                )
            ticket.organisation = organisation
            self._organisation_of[ticket.holder] = organisation
            return ticket

    def organisation_of(self, holder: str) -> str | None:
        """The organisation a SuperNode joined as, once it has."""
        with self._lock:
            return self._organisation_of.get(holder)
